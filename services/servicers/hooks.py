"""Hooks.Filter and Hooks.Describe: a turn's Thinker tokens -> the deployment's `FilterChain` -> released text,
events, tool continuations (`resume`). The lockstep contract is in protos/omni/v1/hooks.proto."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Struct

from services.errors import InvalidInput
from services.hooks import FilterChain, HookContext, HookEvent, LocalHooks, Released
from services.servicers import REQUEST_ID, read_start
from services.servicers.status import translate_errors
from services.wire.gen.omni.v1 import common_pb2, hooks_pb2_grpc
from services.wire.gen.omni.v1.common_pb2 import FINISH_REASON_STOP
from services.wire.gen.omni.v1.hooks_pb2 import (
    DescribeRequest,
    FilterEnd,
    FilterRequest,
    FilterResponse,
    HooksInfo,
)
from services.wire.gen.omni.v1.hooks_pb2 import Released as ReleasedMsg
from services.wire.gen.omni.v1.thinker_pb2 import ThinkResume


class HooksServicer(hooks_pb2_grpc.HooksServicer):
    service = "Hooks"
    add_to_server = staticmethod(hooks_pb2_grpc.add_HooksServicer_to_server)

    def __init__(self, chain: FilterChain, processor):
        """`processor`: the checkpoint's (its tokenizer decodes and re-encodes text, its chat template renders
        tool continuations exactly as the gateway renders prompts)."""
        self.chain = chain
        self.processor = processor
        self.active = 0  # turns in progress: the replica's load for Serve's autoscaler

    async def Describe(self, request: DescribeRequest, context: grpc.aio.ServicerContext) -> HooksInfo:
        schemas = self.chain.tool_schemas()
        return HooksInfo(filters=[link.name for link in self.chain.links],
                         tools_json=json.dumps(schemas) if schemas else "", max_tool_steps=self.chain.max_tool_steps)

    async def Filter(self, requests: AsyncIterator[FilterRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[FilterResponse]:
        self.active += 1
        try:
            async with translate_errors(context, "hooks"):
                start = await read_start(requests, "Filter")
                REQUEST_ID.set(start.request_id)
                hooks = LocalHooks(self.chain.only(list(start.hooks)), self.processor)
                async with hooks.open(_context(start)) as turn:
                    async for msg in requests:
                        kind = msg.WhichOneof("kind")
                        if kind == "tokens":
                            released = Released()
                            for token_id in msg.tokens.token_ids:
                                _merge(released, await turn.feed(token_id))
                                if released.stop:
                                    break
                        elif kind == "thinker_end":
                            released = await turn.thinker_end(msg.thinker_end.finish_reason == FINISH_REASON_STOP)
                        else:
                            raise InvalidInput(
                                f"Filter: expected tokens or thinker_end, got {kind or 'an empty message'}")
                        for event in released.events:
                            yield FilterResponse(event=hook_event_to_proto(event))
                        yield FilterResponse(released=ReleasedMsg(
                            token_ids=released.token_ids, text=released.text, blocked=released.stop,
                            reasoning=released.reasoning, reasoning_token_ids=released.reasoning_ids))
                        if released.resume is not None:
                            yield FilterResponse(resume=ThinkResume(token_ids=released.resume))
                        elif released.stop or kind == "thinker_end":
                            yield FilterResponse(end=FilterEnd())
                            return
                    raise InvalidInput("Filter: the stream ended before thinker_end")
        finally:
            self.active -= 1


def _context(start) -> HookContext:
    try:
        conversation = json.loads(start.conversation_json) if start.conversation_json else []
    except json.JSONDecodeError as e:
        raise InvalidInput(f"Filter: conversation_json is not JSON: {e}") from None
    if not isinstance(conversation, list) or not all(isinstance(m, dict) and "role" in m for m in conversation):
        raise InvalidInput("Filter: conversation_json must be a list of chat messages with a role")
    return HookContext(request_id=start.request_id, session_id=start.session_id, conversation=conversation,
                       metadata=dict(start.metadata), principal=start.principal)


def _merge(into: Released, more: Released) -> None:
    into.extend(more)


def hook_event_to_proto(event: HookEvent) -> common_pb2.HookEvent:
    data = Struct()
    data.update(json.loads(json.dumps(dict(event.data), default=str)))  # JSON values only: Struct's domain
    return common_pb2.HookEvent(hook=event.hook, type=event.type, message=event.message, data=data)


def hook_event_from_proto(msg: common_pb2.HookEvent) -> HookEvent:
    return HookEvent(msg.hook, msg.type, msg.message, json_format.MessageToDict(msg.data))
