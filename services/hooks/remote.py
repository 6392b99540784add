"""User code over gRPC (`protos/omni/v1/text_filter.proto`): a remote text filter as a link of the chain, and tools
served by a gRPC endpoint.

A `RemoteFilter` opens one `TextFilter.Filter` stream per request and asks it for a verdict per piece, waiting at
most `deadline_s` each time. Whatever goes wrong with the remote side (the deadline, a failed or closed stream, an
answer that is not a verdict) is one failure, handled by the link's policy: `fail_open` releases the text unfiltered
and bypasses the filter for the rest of the request; `fail_closed` stops the answer with the fallback. Either way
an event says what happened, and the request is the only one affected.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from google.protobuf.json_format import MessageToDict

from services.errors import InvalidInput
from services.hooks.sdk import Block, FilterTurn, HookContext, Hold, Release, TextFilter, Verdict
from services.hooks.tools import Tool
from services.wire.gen.omni.v1 import text_filter_pb2_grpc
from services.wire.gen.omni.v1.omni_pb2 import ChatMessage
from services.wire.gen.omni.v1.text_filter_pb2 import TextFilterRequest, TextFilterStart, TextPiece, ToolRequest
from services.wire.server import GRPC_OPTIONS

log = logging.getLogger(__name__)

# grpc.aio channels belong to the event loop that made them: one per target and loop, shared by its requests.
_channels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, grpc.aio.Channel]] = \
    weakref.WeakKeyDictionary()


def channel(target: str) -> grpc.aio.Channel:
    per_loop = _channels.setdefault(asyncio.get_running_loop(), {})
    if target not in per_loop:
        per_loop[target] = grpc.aio.insecure_channel(target, options=GRPC_OPTIONS)
    return per_loop[target]


class _RemoteFailure(Exception):
    """The remote side failed this request: the link's failure policy decides what happens."""


@dataclass
class _Stream:
    call: grpc.aio.StreamStreamCall | None = None
    failure: str | None = None  # why the remote side failed; the policy applies at the next verdict
    bypassed: bool = False  # failed open: pass the text through for the rest of the request


class RemoteFilter(TextFilter):
    """A link of the chain served by `omni.v1.TextFilter` at `target`."""

    def __init__(self, target: str, deadline_s: float = 0.25,
                 on_failure: Literal["fail_open", "fail_closed"] = "fail_closed",
                 params: Mapping[str, Any] | None = None):
        if on_failure not in ("fail_open", "fail_closed"):
            raise InvalidInput(f"on_failure must be 'fail_open' or 'fail_closed', got {on_failure!r}")
        if deadline_s <= 0:
            raise InvalidInput(f"deadline_s must be positive, got {deadline_s}")
        self.target, self.deadline_s, self.on_failure = target, deadline_s, on_failure
        self.params = json.dumps(dict(params or {}))

    async def start(self, turn: FilterTurn) -> None:
        state = turn.state = _Stream()
        ctx = turn.ctx
        start = TextFilterStart(request_id=ctx.request_id, session_id=ctx.session_id, metadata=dict(ctx.metadata),
                                conversation=[_chat_message(m) for m in ctx.conversation], params=self.params,
                                principal=ctx.principal)
        try:
            state.call = text_filter_pb2_grpc.TextFilterStub(channel(self.target)).Filter()
            async with asyncio.timeout(self.deadline_s):
                await state.call.write(TextFilterRequest(start=start))
        except (TimeoutError, grpc.RpcError, asyncio.InvalidStateError) as e:
            state.failure = _describe(e, self.deadline_s)

    async def on_text(self, text: str, turn: FilterTurn) -> Verdict:
        piece = TextPiece(text=text, ahead=turn.ahead, reasoning=turn.reasoning)
        return await self._ask(turn, TextFilterRequest(text=piece), text)

    async def on_end(self, text: str, turn: FilterTurn) -> Verdict:
        return await self._ask(turn, TextFilterRequest(end=TextPiece(text=text, reasoning=turn.reasoning)), text)

    async def stop(self, turn: FilterTurn) -> None:
        if turn.state is not None and turn.state.call is not None:
            turn.state.call.cancel()

    async def _ask(self, turn: FilterTurn, request: TextFilterRequest, text: str) -> Verdict:
        state: _Stream = turn.state
        if state.bypassed:
            return Release(text)
        try:
            if state.failure is not None:
                raise _RemoteFailure(state.failure)
            try:
                async with asyncio.timeout(self.deadline_s):
                    await state.call.write(request)
                    answer = await state.call.read()
            except (TimeoutError, grpc.RpcError, asyncio.InvalidStateError) as e:
                raise _RemoteFailure(_describe(e, self.deadline_s)) from None
            return _verdict(answer, turn)
        except _RemoteFailure as e:
            return self._failed(turn, str(e), text)

    def _failed(self, turn: FilterTurn, why: str, text: str) -> Verdict:
        state: _Stream = turn.state
        if state.call is not None:
            state.call.cancel()
        message = f"remote filter {turn.name!r} at {self.target} failed: {why}"
        log.warning("%s (request %r, %s)", message, turn.ctx.request_id, self.on_failure)
        if self.on_failure == "fail_closed":
            return Block(message)
        state.bypassed = True
        turn.emit("filter_failed_open", message + "; the text passes unfiltered from now on")
        return Release(text)


def _verdict(answer, turn: FilterTurn) -> Verdict:
    if answer is grpc.aio.EOF:
        raise _RemoteFailure("the filter closed the stream before answering")
    if answer is None:  # grpc logs the parse error and hands back None
        raise _RemoteFailure("the answer is not a TextVerdict message")
    kind = answer.WhichOneof("kind")
    if kind is None:
        raise _RemoteFailure("the answer is not a verdict (no release, hold or block)")
    for e in answer.events:
        turn.emit(e.type, e.message, **MessageToDict(e.data))
    if kind == "release":
        return Release(answer.release.text, answer.release.keep)
    if kind == "hold":
        return Hold()
    return Block(answer.block.reason or "blocked by a remote filter",
                 answer.block.fallback if answer.block.HasField("fallback") else None)


def _describe(e: BaseException, deadline_s: float) -> str:
    if isinstance(e, TimeoutError):
        return f"no answer within its deadline of {deadline_s:g} s"
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def _chat_message(m: Mapping[str, Any]) -> ChatMessage:
    """A chat-template message as text only (media parts are left out)."""
    content = m.get("content", "")
    if not isinstance(content, str):
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    return ChatMessage(role=m.get("role", ""), text=content)


def grpc_tool(target: str, *, name: str, description: str, parameters: dict[str, Any],
              timeout_s: float = 30.0) -> Tool:
    """A tool served by `omni.v1.Tool` at `target`; a failed call reaches the Thinker as an error."""

    async def call(arguments: dict[str, Any], ctx: HookContext) -> str:
        stub = text_filter_pb2_grpc.ToolStub(channel(target))
        request = ToolRequest(name=name, arguments=json.dumps(arguments), request_id=ctx.request_id,
                              session_id=ctx.session_id, metadata=dict(ctx.metadata), principal=ctx.principal)
        try:
            return (await stub.Call(request, timeout=timeout_s)).content
        except grpc.aio.AioRpcError as e:
            raise RuntimeError(f"{target}: {e.code().name}: {e.details()}") from None

    return Tool(name, description, parameters, call, timeout_s)
