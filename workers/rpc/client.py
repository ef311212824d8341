"""A Python caller's view: one long-lived ``ScoreStream``, ``await client.score(txn)``.

Requests are matched to responses by request_id with futures, so many can be in flight
on the one stream. If the stream breaks, every waiting caller gets ``StreamBroken`` at
once (nothing hangs), and the next ``score`` opens a new stream.

    async with ScoringClient("127.0.0.1:50051") as client:
        decision = await client.score(txn, budget_ms=5)
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import grpc

from workers.codec import decision_from_proto, transaction_to_proto
from workers.errors import ScoreRejected, StreamBroken
from workers.proto.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from workers.records import Decision, Transaction


class _Stream:
    """One ScoreStream call and the futures waiting on it; a reconnect makes a new one."""

    def __init__(self, call: grpc.aio.StreamStreamCall, target: str) -> None:
        self.call = call
        self.waiting: dict[str, asyncio.Future[fraud_pb2.ScoreResponse]] = {}
        self.write_lock = asyncio.Lock()  # grpc.aio allows one outstanding write per call
        self.receiver = asyncio.create_task(self._receive(target))

    def usable(self) -> bool:
        return not self.call.done() and not self.receiver.done()

    async def _receive(self, target: str) -> None:
        reason = "the server ended the stream"
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    break
                future = self.waiting.get(response.request_id)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "the client closed the stream"
        finally:
            error = StreamBroken(f"stream to {target} broke ({reason})")
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(error)


class ScoringClient:
    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        self._target = target
        self._credentials = credentials
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        # Client pings every 20 s: above the server's 10 s minimum, so it is never GOAWAYed.
        self._options = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000), *options]
        self._channel: grpc.aio.Channel | None = None
        self._stream: _Stream | None = None
        self._ids = itertools.count()
        self._open_lock = asyncio.Lock()

    async def __aenter__(self) -> ScoringClient:
        await self._ensure_stream()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def score(self, txn: Transaction, budget_ms: float | None = None) -> Decision:
        """The decision on ``txn``; raises ``ScoreRejected`` or ``StreamBroken``."""
        response = await self.score_raw(transaction_to_proto(txn), budget_ms)
        return decision_from_proto(response.decision)

    async def score_raw(
        self, transaction: fraud_pb2.Transaction, budget_ms: float | None = None
    ) -> fraud_pb2.ScoreResponse:
        stream = await self._ensure_stream()
        request_id = str(next(self._ids))
        budget_us = 0 if budget_ms is None else max(1, int(budget_ms * 1000))
        future = asyncio.get_running_loop().create_future()
        stream.waiting[request_id] = future
        try:
            async with stream.write_lock:
                await stream.call.write(
                    fraud_pb2.ScoreRequest(request_id=request_id, transaction=transaction, budget_us=budget_us)
                )
            response = await future
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            ended = await _call_status(stream.call)
            raise StreamBroken(f"stream to {self._target} failed: {ended or exc}") from exc
        finally:
            stream.waiting.pop(request_id, None)
            # A write that failed leaves the future to the reader, which fails it too: mark that
            # error seen (this call raises its own), or asyncio logs it as never retrieved.
            if future.done() and not future.cancelled():
                future.exception()
            else:
                future.cancel()
        if response.WhichOneof("result") == "error":
            raise ScoreRejected(response.error.code, response.error.message)
        return response

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.call.cancel()
            await asyncio.gather(self._stream.receiver, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        self._stream = self._channel = None

    async def _ensure_stream(self) -> _Stream:
        async with self._open_lock:
            if self._stream is None or not self._stream.usable():
                if self._channel is None:
                    self._channel = self._open_channel()
                call = fraud_pb2_grpc.FraudScoringStub(self._channel).ScoreStream(metadata=self._metadata)
                self._stream = _Stream(call, self._target)
            return self._stream

    def _open_channel(self) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(self._target, self._credentials, options=self._options)
        return grpc.aio.insecure_channel(self._target, options=self._options)


async def _call_status(call: grpc.aio.StreamStreamCall, wait_s: float = 1.0) -> str | None:
    """How the call itself ended ("UNAUTHENTICATED: ..."), when a write failed because it had:
    the failed write's own error only says the write could not be sent (INTERNAL)."""
    try:
        code = await asyncio.wait_for(call.code(), wait_s)
        details = await asyncio.wait_for(call.details(), wait_s)
    except (TimeoutError, grpc.aio.AioRpcError, asyncio.CancelledError):
        return None
    return f"{code.name}: {details}"
