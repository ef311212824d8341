"""``fraud.v1.FraudScoring`` on grpc.aio: unary, batch and bidirectional stream.

The methods are registered with no request deserializer (``add_to_server``): each handler
gets the frame's bytes and decodes them itself, so an undecodable frame on a stream gets a
``ScoreResponse.error`` and the stream lives on, and a unary call answers INVALID_ARGUMENT,
instead of grpc ending the call with UNKNOWN from inside its generated deserializer.

Validation reuses ``codec.transaction_from_proto`` (the Kafka path's rules), and a bad
request gets a ``ScoreResponse.error`` for its request_id: one caller's bad message must
not tear down a stream that carries other requests.

Decisions are counted (``metrics.count_decisions``) where they are handed to grpc for the
caller, and only there: an answer for a stream or a call that has gone is never counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf.message import DecodeError

from workers import metrics
from workers.codec import MAX_EVENT_BYTES, decision_to_proto, transaction_from_proto
from workers.errors import InvalidEvent
from workers.proto.fraud.v1 import fraud_pb2
from workers.records import MAX_ID_CHARS, Decision, Transaction
from workers.rpc.dispatch import Dispatcher, MethodMetrics, Pending
from workers.types import BatchTiming

SERVICE_NAME = fraud_pb2.DESCRIPTOR.services_by_name["FraudScoring"].full_name

# google.rpc.Code values carried in ScoreError.code
INVALID_ARGUMENT = 3
ALREADY_EXISTS = 6

# One ScoreRequest, on any path (Score, each of a ScoreBatch, a stream frame, a REST body):
# the limit a Kafka event has. A real request is a few hundred bytes.
MAX_REQUEST_BYTES = MAX_EVENT_BYTES


def error_response(
    request_id: str, code: int, message: str, *, duplicate_request_id: bool = False
) -> fraud_pb2.ScoreResponse:
    error = fraud_pb2.ScoreError(code=code, message=message, duplicate_request_id=duplicate_request_id)
    return fraud_pb2.ScoreResponse(request_id=request_id, error=error)


def decision_response(request_id: str, decision: Decision, timing: BatchTiming) -> fraud_pb2.ScoreResponse:
    message = decision_to_proto(decision)
    t = message.timing
    t.queue_us, t.enrich_us, t.inference_us = timing.queue_us, timing.enrich_us, timing.inference_us
    t.decide_us, t.total_us = timing.decide_us, timing.total_us
    return fraud_pb2.ScoreResponse(request_id=request_id, decision=message)


class BadFrame(Exception):
    """A frame that is not a usable ScoreRequest at all: no request_id can be trusted."""


def parse_request(frame: bytes) -> fraud_pb2.ScoreRequest:
    """The frame as a ScoreRequest, or ``BadFrame`` saying why not (never anything else)."""
    if len(frame) > MAX_REQUEST_BYTES:
        raise BadFrame(f"request is {len(frame)} bytes, the limit is {MAX_REQUEST_BYTES}")
    request = fraud_pb2.ScoreRequest()
    try:
        request.ParseFromString(frame)
    except DecodeError as exc:  # the parser's one failure (nesting too deep included)
        raise BadFrame(f"undecodable fraud.v1.ScoreRequest: {exc or 'malformed protobuf'}") from None
    return request


def id_error(request_id: str) -> fraud_pb2.ScoreResponse | None:
    """The error answering an over-long request_id (not echoed: it is the problem), or None."""
    if len(request_id) <= MAX_ID_CHARS:
        return None
    message = f"request_id is {len(request_id)} characters, the limit is {MAX_ID_CHARS}"
    return error_response("", INVALID_ARGUMENT, message)


def validated(request: fraud_pb2.ScoreRequest) -> Transaction | fraud_pb2.ScoreResponse:
    """The request's transaction, or the error response that answers it."""
    too_long = id_error(request.request_id)
    if too_long is not None:
        return too_long
    if not request.HasField("transaction"):
        return error_response(request.request_id, INVALID_ARGUMENT, "transaction is required")
    try:
        return transaction_from_proto(request.transaction)
    except InvalidEvent as exc:
        return error_response(request.request_id, INVALID_ARGUMENT, f"invalid transaction: {exc.reason}")


def traceparent_of(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's W3C ``traceparent`` from the call's metadata, if it sent one."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def count_answered(decisions: Sequence[Decision | None]) -> None:
    """Counts the decisions among answers handed to callers (errors are not decisions)."""
    metrics.count_decisions([d for d in decisions if d is not None])


Answer = tuple[fraud_pb2.ScoreResponse, Decision | None]


class FraudScoringServicer:
    def __init__(
        self,
        dispatcher: Dispatcher,
        max_in_flight_per_stream: int = 1024,
        max_unanswered_bytes_per_stream: int = 4 * 1024 * 1024,
    ) -> None:
        self._dispatcher = dispatcher
        self._max_in_flight = max_in_flight_per_stream
        self._max_unanswered_bytes = max_unanswered_bytes_per_stream
        self._score = MethodMetrics("Score")
        self._batch = MethodMetrics("ScoreBatch")
        self._stream = MethodMetrics("ScoreStream")
        self._sessions: set[StreamSession] = set()

    def drain(self) -> None:
        """Shutdown: streams stop reading, answer what they hold, and end with OK."""
        for session in list(self._sessions):
            session.stop_reading()

    async def Score(self, frame: bytes, context: grpc.aio.ServicerContext) -> fraud_pb2.ScoreResponse:
        try:
            request = parse_request(frame)
        except BadFrame as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        response, decision = await self._answer(request, self._score, traceparent_of(context))
        count_answered((decision,))
        return response

    async def ScoreBatch(self, frame: bytes, context: grpc.aio.ServicerContext) -> fraud_pb2.ScoreBatchResponse:
        batch = fraud_pb2.ScoreBatchRequest()
        try:
            batch.ParseFromString(frame)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable fraud.v1.ScoreBatchRequest: {exc}")
        # Submitted one by one: the engine batches them again, each keeps its own budget.
        traceparent = traceparent_of(context)
        answers = await asyncio.gather(*(self._answer_one_of_batch(r, traceparent) for r in batch.requests))
        count_answered([decision for _, decision in answers])
        return fraud_pb2.ScoreBatchResponse(responses=[response for response, _ in answers])

    async def ScoreStream(self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        session = StreamSession(self._dispatcher, self._stream, self._max_in_flight, self._max_unanswered_bytes)
        self._sessions.add(session)
        metrics.GRPC_ACTIVE_STREAMS.inc()
        try:
            await session.run(frames, context)
        finally:
            metrics.GRPC_ACTIVE_STREAMS.dec()
            self._sessions.discard(session)

    async def _answer_one_of_batch(self, request: fraud_pb2.ScoreRequest, traceparent: str | None) -> Answer:
        # A frame is held to the request limit whole (parse_request); one of a batch, here.
        if request.ByteSize() > MAX_REQUEST_BYTES:
            return error_response("", INVALID_ARGUMENT, f"request is over {MAX_REQUEST_BYTES} bytes"), None
        return await self._answer(request, self._batch, traceparent)

    async def _answer(self, request: fraud_pb2.ScoreRequest, method: MethodMetrics, traceparent: str | None) -> Answer:
        txn = validated(request)
        if isinstance(txn, fraud_pb2.ScoreResponse):
            return txn, None
        decision, timing = await self._dispatcher.decide(txn, request.budget_us, method, traceparent)
        return decision_response(request.request_id, decision, timing), decision


def add_to_server(servicer: FraudScoringServicer, server: grpc.aio.Server) -> None:
    """Registers the service with raw-bytes requests (see the module doc); responses are
    serialized by grpc as the generated code does."""
    serialize = fraud_pb2.ScoreResponse.SerializeToString
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(servicer.Score, response_serializer=serialize),
        "ScoreBatch": grpc.unary_unary_rpc_method_handler(
            servicer.ScoreBatch, response_serializer=fraud_pb2.ScoreBatchResponse.SerializeToString
        ),
        "ScoreStream": grpc.stream_stream_rpc_method_handler(servicer.ScoreStream, response_serializer=serialize),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class ByteBudget:
    """Bytes of requests read from one stream and not yet answered; ``acquire`` waits while
    the budget is spent. One request is always let in, whatever its size (the frame limit
    bounds it), so a budget smaller than a frame cannot wedge the stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._released = asyncio.Event()

    async def acquire(self, size: int) -> None:
        while self.held and self.held + size > self.limit:
            self._released.clear()
            await self._released.wait()
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size
        self._released.set()


_READING_STOPPED = object()


class StreamSession:
    """One ScoreStream call: a reader task submits, the handler writes in completion order.

    At most ``max_in_flight`` requests, and about ``max_unanswered_bytes`` of their frames,
    are read but not yet written; past that the reader waits, gRPC stops granting the
    client HTTP/2 window, and a client that does not read its responses blocks on send
    instead of growing the server's memory. When the call ends (done, cancelled, broken),
    ``close`` lets go of everything the session holds: its queue, and the dispatcher's
    pending requests for it (their answers, when the engine has them, are dropped).
    """

    def __init__(
        self, dispatcher: Dispatcher, method: MethodMetrics, max_in_flight: int, max_unanswered_bytes: int
    ) -> None:
        self._dispatcher = dispatcher
        self._method = method
        self._slots = asyncio.Semaphore(max_in_flight)
        self._bytes = ByteBudget(max_unanswered_bytes)
        self._ready: asyncio.Queue = asyncio.Queue()
        self._in_flight: dict[str, Pending] = {}
        self._unwritten = 0
        self._reading_done = False
        self._closed = False
        self._reader: asyncio.Task | None = None
        self._traceparent: str | None = None

    async def run(self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        # A stream's requests continue the trace its call's metadata names (one per stream).
        self._traceparent = traceparent_of(context)
        reader = self._reader = asyncio.create_task(self._read(frames))
        try:
            await self._write(context)
        finally:
            reader.cancel()
            self.close()
        if reader.done() and not reader.cancelled():
            failure = reader.exception()
            if failure is not None:
                raise failure

    def stop_reading(self) -> None:
        if self._reader is not None:
            self._reader.cancel()

    def close(self) -> None:
        self._closed = True
        for pending in self._in_flight.values():
            pending.abandon()
        self._in_flight.clear()
        self._ready = asyncio.Queue()  # drops unwritten answers

    async def _read(self, frames: AsyncIterator[bytes]) -> None:
        try:
            async for frame in frames:
                await self._slots.acquire()
                await self._bytes.acquire(len(frame))
                self._unwritten += 1
                self._accept(frame)
        finally:
            self._reading_done = True
            self._ready.put_nowait(_READING_STOPPED)  # wakes the writer to check for the end

    async def _write(self, context: grpc.aio.ServicerContext) -> None:
        while not (self._reading_done and self._unwritten == 0):
            item = await self._ready.get()
            if item is _READING_STOPPED:
                continue
            response, decision, cost = item
            await context.write(response)
            count_answered((decision,))
            self._unwritten -= 1
            self._slots.release()
            self._bytes.release(cost)

    def _accept(self, frame: bytes) -> None:
        cost = len(frame)
        try:
            request = parse_request(frame)
        except BadFrame as exc:
            self._answer(error_response("", INVALID_ARGUMENT, str(exc)), cost)
            return
        request_id = request.request_id
        if not request_id:
            self._answer(error_response("", INVALID_ARGUMENT, "request_id is required on a stream"), cost)
            return
        txn = validated(request)  # an over-long request_id is refused here, before it is used as a key
        if isinstance(txn, fraud_pb2.ScoreResponse):
            self._answer(txn, cost)
            return
        if request_id in self._in_flight:
            message = f"request_id {request_id!r} is already in flight on this stream; this answers the repeat only"
            self._answer(error_response(request_id, ALREADY_EXISTS, message, duplicate_request_id=True), cost)
            return

        def answered(decision: Decision, timing: BatchTiming) -> None:
            if self._closed:
                return
            self._in_flight.pop(request_id, None)
            self._answer(decision_response(request_id, decision, timing), cost, decision)

        pending = self._dispatcher.submit(txn, request.budget_us, self._method, answered, self._traceparent)
        if not pending.done:  # shed or past its budget: answered inside submit already
            self._in_flight[request_id] = pending

    def _answer(self, response: fraud_pb2.ScoreResponse, cost: int, decision: Decision | None = None) -> None:
        self._ready.put_nowait((response, decision, cost))
