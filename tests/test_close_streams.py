"""`CloseStreams`: a streaming handler whose client cancels mid-stream is closed in the call's own task, so its
cleanup runs at once and OpenTelemetry's server interceptor (attached across the handler's yields) detaches its
context cleanly. Real gRPC over loopback, with OpenTelemetry's interceptor as the stage servers have it."""

from __future__ import annotations

import asyncio
import contextvars
import logging

import grpc
import pytest
from opentelemetry.instrumentation.grpc import aio_server_interceptor

from services.wire.server import CloseStreams

METHOD = "/test.Stream/Numbers"
MESSAGES = 2000
_attached: contextvars.ContextVar[int] = contextvars.ContextVar("attached", default=0)


class Handler:
    """A server stream that holds a context token across its yields, as OpenTelemetry's interceptor does, and
    records the task its cleanup ran in."""

    def __init__(self):
        self.started_in: asyncio.Task | None = None
        self.closed_in: asyncio.Task | None = None
        self.reset_error: Exception | None = None
        self.closed = asyncio.Event()

    async def numbers(self, request: bytes, context):
        self.started_in = asyncio.current_task()
        token = _attached.set(1)
        try:
            for i in range(MESSAGES):
                yield i.to_bytes(4, "big") * 256
        finally:
            try:
                _attached.reset(token)
            except ValueError as e:  # reset in another task's context
                self.reset_error = e
            self.closed_in = asyncio.current_task()
            self.closed.set()


async def _cancel_mid_stream(interceptors: list, handler: Handler) -> None:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Stream", {"Numbers": grpc.unary_stream_rpc_method_handler(handler.numbers)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream(METHOD)(b"")
            await call.read()  # the first message: the server is now writing the rest
            call.cancel()
        await asyncio.wait_for(handler.closed.wait(), 5)
    finally:
        await server.stop(None)


async def test_a_cancelled_stream_closes_in_its_own_call():
    handler = Handler()
    await _cancel_mid_stream([CloseStreams()], handler)
    assert handler.closed_in is handler.started_in, "the handler was closed in another task (the GC's)"
    assert handler.reset_error is None


async def test_opentelemetry_detaches_its_context_when_a_stream_is_cancelled(caplog):
    """OpenTelemetry's interceptor is closed in the call's task; the handler it wraps, which it does not close
    itself, soon after (so a stage handler holds no context token across a yield: `services.tracing`)."""
    handler = Handler()
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        await _cancel_mid_stream([CloseStreams(), aio_server_interceptor()], handler)
    assert not [r for r in caplog.records if "Failed to detach context" in r.getMessage()]
