"""``fraud.v1.FraudScoring`` on grpc.aio: unary, batch and bidirectional stream.

Validation reuses ``codec.transaction_from_proto`` (the Kafka path's rules), and a bad
request gets a ``ScoreResponse.error`` for its request_id: one caller's bad message must
not tear down a stream that carries other requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from workers import metrics
from workers.codec import decision_to_proto, transaction_from_proto
from workers.errors import InvalidEvent
from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from workers.records import Decision, Transaction
from workers.rpc.dispatch import Dispatcher, MethodMetrics
from workers.types import BatchTiming

# google.rpc.Code values carried in ScoreError.code
INVALID_ARGUMENT = 3
ALREADY_EXISTS = 6


def error_response(request_id: str, code: int, message: str) -> fraud_pb2.ScoreResponse:
    return fraud_pb2.ScoreResponse(request_id=request_id, error=fraud_pb2.ScoreError(code=code, message=message))


def decision_response(request_id: str, decision: Decision, timing: BatchTiming) -> fraud_pb2.ScoreResponse:
    message = decision_to_proto(decision)
    t = message.timing
    t.queue_us, t.enrich_us, t.inference_us = timing.queue_us, timing.enrich_us, timing.inference_us
    t.decide_us, t.total_us = timing.decide_us, timing.total_us
    return fraud_pb2.ScoreResponse(request_id=request_id, decision=message)


def validated(request: fraud_pb2.ScoreRequest) -> Transaction | fraud_pb2.ScoreResponse:
    """The request's transaction, or the error response that answers it."""
    if not request.HasField("transaction"):
        return error_response(request.request_id, INVALID_ARGUMENT, "transaction is required")
    try:
        return transaction_from_proto(request.transaction)
    except InvalidEvent as exc:
        return error_response(request.request_id, INVALID_ARGUMENT, f"invalid transaction: {exc.reason}")


class FraudScoringServicer(fraud_pb2_grpc.FraudScoringServicer):
    def __init__(self, dispatcher: Dispatcher, max_in_flight_per_stream: int = 1024) -> None:
        self._dispatcher = dispatcher
        self._max_in_flight = max_in_flight_per_stream
        self._score = MethodMetrics("Score")
        self._batch = MethodMetrics("ScoreBatch")
        self._stream = MethodMetrics("ScoreStream")
        self._sessions: set[StreamSession] = set()

    def drain(self) -> None:
        """Shutdown: streams stop reading, answer what they hold, and end with OK."""
        for session in list(self._sessions):
            session.stop_reading()

    async def Score(
        self, request: fraud_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> fraud_pb2.ScoreResponse:
        return await self._answer(request, self._score)

    async def ScoreBatch(
        self, request: fraud_pb2.ScoreBatchRequest, context: grpc.aio.ServicerContext
    ) -> fraud_pb2.ScoreBatchResponse:
        # Submitted one by one: the engine batches them again, each keeps its own budget.
        responses = await asyncio.gather(*(self._answer(r, self._batch) for r in request.requests))
        return fraud_pb2.ScoreBatchResponse(responses=responses)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[fraud_pb2.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> None:
        session = StreamSession(self._dispatcher, self._stream, self._max_in_flight)
        self._sessions.add(session)
        metrics.GRPC_ACTIVE_STREAMS.inc()
        try:
            await session.run(request_iterator, context)
        finally:
            metrics.GRPC_ACTIVE_STREAMS.dec()
            self._sessions.discard(session)

    async def _answer(self, request: fraud_pb2.ScoreRequest, method: MethodMetrics) -> fraud_pb2.ScoreResponse:
        txn = validated(request)
        if isinstance(txn, fraud_pb2.ScoreResponse):
            return txn
        decision, timing = await self._dispatcher.decide(txn, request.budget_us, method)
        return decision_response(request.request_id, decision, timing)


_READING_STOPPED = object()


class StreamSession:
    """One ScoreStream call: a reader task submits, the handler writes in completion order.

    At most ``max_in_flight`` requests are read but not yet written; past that the reader
    waits, gRPC stops granting the client HTTP/2 window, and a client that does not read
    its responses blocks on send instead of growing the server's memory.
    """

    def __init__(self, dispatcher: Dispatcher, method: MethodMetrics, max_in_flight: int) -> None:
        self._dispatcher = dispatcher
        self._method = method
        self._slots = asyncio.Semaphore(max_in_flight)
        self._ready: asyncio.Queue = asyncio.Queue()
        self._in_flight_ids: set[str] = set()
        self._unwritten = 0
        self._reading_done = False
        self._reader: asyncio.Task | None = None

    async def run(
        self, request_iterator: AsyncIterator[fraud_pb2.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> None:
        reader = self._reader = asyncio.create_task(self._read(request_iterator))
        try:
            await self._write(context)
        finally:
            reader.cancel()
        if reader.done() and not reader.cancelled():
            failure = reader.exception()
            if failure is not None:
                raise failure

    def stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.cancel()

    async def _read(self, request_iterator: AsyncIterator[fraud_pb2.ScoreRequest]) -> None:
        try:
            async for request in request_iterator:
                await self._slots.acquire()
                self._unwritten += 1
                self._accept(request)
        finally:
            self._reading_done = True
            self._ready.put_nowait(_READING_STOPPED)  # wakes the writer to check for the end

    async def _write(self, context: grpc.aio.ServicerContext) -> None:
        ready = self._ready
        while not (self._reading_done and self._unwritten == 0):
            response = await ready.get()
            if response is _READING_STOPPED:
                continue
            await context.write(response)
            self._unwritten -= 1
            self._slots.release()

    def _accept(self, request: fraud_pb2.ScoreRequest) -> None:
        request_id = request.request_id
        if not request_id:
            self._ready.put_nowait(error_response("", INVALID_ARGUMENT, "request_id is required on a stream"))
            return
        if request_id in self._in_flight_ids:
            message = f"request_id {request_id!r} is already in flight on this stream"
            self._ready.put_nowait(error_response(request_id, ALREADY_EXISTS, message))
            return
        txn = validated(request)
        if isinstance(txn, fraud_pb2.ScoreResponse):
            self._ready.put_nowait(txn)
            return
        self._in_flight_ids.add(request_id)

        def answered(decision: Decision, timing: BatchTiming) -> None:
            self._in_flight_ids.discard(request_id)
            self._ready.put_nowait(decision_response(request_id, decision, timing))

        self._dispatcher.submit(txn, request.budget_us, self._method, answered)
