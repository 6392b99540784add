"""The hook stage as its own gRPC service (`omni.v1.Hooks`, `HooksServicer`) and its client (`RemoteHooks`): a
conductor calling the stage over loopback gRPC gives the same turn as the same chain run in process, tool
continuations included; the lockstep protocol and bad input behave as protos/omni/v1/hooks.proto says."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import grpc
import pytest

from services.conductor import Conductor, TurnRequest
from services.engines.bundle import Engines
from services.engines.sampling import SamplingParams
from services.events import TextDelta, TurnSummary
from services.hooks import Blocklist, FilterChain, Hold, Link, Redact, Release, TextFilter, ToolRegistry, python_tool
from services.remote import RemoteHooks
from services.servicers import serve_stage
from services.servicers.hooks import HooksServicer
from services.stages import Stages
from services.turn_parts import text_part
from services.wire.gen.omni.v1 import common_pb2, hooks_pb2, hooks_pb2_grpc, thinker_pb2
from services.wire.server import GRPC_OPTIONS
from tests.helpers import SpyTalker, a_word
from tests.test_tool_flow import ANSWER, CALL, ScriptedThinker

GREEDY = SamplingParams(greedy=True)
ASK = TurnRequest(parts=[text_part("Tell me something.")], max_new_tokens=20, max_audio_frames=40,
                  thinker_sampling=GREEDY, request_id="r1", session_id="s1", metadata={"user": "u1"})


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return Engines.load(tiny_ckpt)


class Boom(TextFilter):
    async def on_text(self, text, turn):
        raise RuntimeError("it went boom")


class Seen(TextFilter):
    """Holds nothing; records the context each turn saw."""

    def __init__(self):
        self.contexts = []

    async def start(self, turn):
        self.contexts.append(turn.ctx)


async def with_stage(chain: FilterChain, processor, body):
    """Serve `chain` as the hook stage on loopback; run `body(RemoteHooks)`."""
    server, port = await serve_stage(HooksServicer(chain, processor), host="127.0.0.1")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
            return await body(RemoteHooks(channel), channel)
    finally:
        await server.stop(None)


def run_turn(engines, hooks, req=ASK, thinker=None):
    stages = Stages.local(engines)
    spy = SpyTalker(stages.talker)
    stages = dataclasses.replace(stages, talker=spy, thinker=thinker or stages.thinker)

    async def go():
        return [e async for e in Conductor(stages, hooks=hooks, stage_timeout_s=120).run(req)]

    return go(), spy


def both(engines, processor, chain, req=ASK, thinker_factory=None):
    """The same turn with `chain` in process and through the stage: (events, Talker input, thinker) of each."""
    local_thinker = thinker_factory() if thinker_factory else None
    coro, local_spy = run_turn(engines, chain, req, local_thinker)
    local = asyncio.run(coro)
    remote_thinker = thinker_factory() if thinker_factory else None

    async def body(hooks, _):
        coro, spy = run_turn(engines, hooks, req, remote_thinker)
        return await coro, spy

    remote, remote_spy = asyncio.run(with_stage(chain, processor, body))
    return (local, local_spy, local_thinker), (remote, remote_spy, remote_thinker)


def assert_same_turn(a: list, b: list) -> None:
    assert isinstance(a[-1], TurnSummary) and isinstance(b[-1], TurnSummary)
    sa, sb = a[-1], b[-1]
    assert (sa.text, sa.thinker_token_ids, sa.codes, sa.finish_reason) == \
           (sb.text, sb.thinker_token_ids, sb.codes, sb.finish_reason)
    # every event but the audio and the summary: text deltas (text and ids) and hook events, in order
    assert [e for e in a[:-1] if not hasattr(e, "samples")] == [e for e in b[:-1] if not hasattr(e, "samples")]


def plain_word(engines) -> str:
    coro, _ = run_turn(engines, None)
    return a_word(asyncio.run(coro)[-1].text)


def test_redact_through_the_stage_equals_in_process(engines, processor):
    word = plain_word(engines)
    chain = FilterChain([Link(Redact(words=[word], replacement="[redacted]"), name="redact")])
    (local, local_spy, _), (remote, remote_spy, _) = both(engines, processor, chain)
    assert_same_turn(local, remote)
    assert remote_spy.received == local_spy.received  # the Talker got the same released ids
    text = "".join(e.text for e in remote if isinstance(e, TextDelta))
    assert word not in text and "[redacted]" in text and text == remote[-1].text
    assert word not in processor.tokenizer.decode(remote_spy.received)


def test_block_through_the_stage_equals_in_process(engines, processor):
    word = plain_word(engines)
    chain = FilterChain([Link(Blocklist(words=[word], fallback="Let us change the subject."), name="block")])
    (local, _, _), (remote, remote_spy, _) = both(engines, processor, chain)
    assert_same_turn(local, remote)
    assert remote[-1].finish_reason == "blocked" and remote[-1].text.endswith("Let us change the subject.")
    assert "Let us change the subject." in processor.tokenizer.decode(remote_spy.received)


def test_empty_chain_through_the_stage_is_the_plain_turn(engines, processor):
    (local, local_spy, _), (remote, remote_spy, _) = both(engines, processor, FilterChain([]))
    assert_same_turn(local, remote)
    assert remote_spy.received == local_spy.received


def test_tool_call_through_the_stage(engines, processor):
    calls = []

    def weather(city: str) -> dict:
        """Current weather for a city."""
        calls.append(city)
        return {"city": city, "sky": "sunny"}

    chain = FilterChain([], tools=ToolRegistry([python_tool(
        weather, parameters={"type": "object", "properties": {"city": {"type": "string"}}})]))
    stop_id = min(Stages.local(engines).stop_ids)
    req = dataclasses.replace(ASK, parts=[text_part("What's the weather in Lisbon?")], max_new_tokens=64)
    (local, _, local_thinker), (remote, remote_spy, remote_thinker) = both(
        engines, processor, chain, req, lambda: ScriptedThinker(processor.tokenizer, [CALL, ANSWER], stop_id))
    assert_same_turn(local, remote)
    assert calls == ["Lisbon", "Lisbon"]  # once per run
    assert remote_thinker.prompts == local_thinker.prompts and len(remote_thinker.prompts) == 2
    assert '"name": "weather"' in remote_thinker.prompts[0]  # declared through Describe
    assert "<tool_response>" in remote_thinker.prompts[1]
    assert remote[-1].text == ANSWER == processor.tokenizer.decode(remote_spy.received)
    assert any(getattr(e, "type", "") == "tool_call" and e.data["arguments"] == {"city": "Lisbon"} for e in remote)


def test_the_stage_sees_the_request_context(engines, processor):
    seen = Seen()
    asyncio.run(with_stage(FilterChain([Link(seen, name="seen")]), processor,
                           lambda hooks, _: run_turn(engines, hooks)[0]))
    ctx = seen.contexts[-1]
    assert (ctx.request_id, ctx.session_id, dict(ctx.metadata)) == ("r1", "s1", {"user": "u1"})
    assert ctx.conversation[-1]["role"] == "user"
    assert {"type": "text", "text": "Tell me something."} in ctx.conversation[-1]["content"]


# ---- the wire protocol, driven by hand ---------------------------------------------------------------------------


def start(**kw) -> hooks_pb2.FilterRequest:
    return hooks_pb2.FilterRequest(start=hooks_pb2.FilterStart(request_id="r", **kw))


def tokens(*ids) -> hooks_pb2.FilterRequest:
    return hooks_pb2.FilterRequest(tokens=common_pb2.Tokens(token_ids=ids))


END = hooks_pb2.FilterRequest(thinker_end=thinker_pb2.ThinkEnd(finish_reason=common_pb2.FINISH_REASON_STOP))


class HoldAll(TextFilter):
    async def on_text(self, text, turn):
        return Hold()

    async def on_end(self, text, turn):
        return Release(text.upper())


def exchange(chain, processor, requests):
    """Send `requests` on one Filter call; the answers' kinds (and payloads), or the call's error."""
    async def body(_, channel):
        call = hooks_pb2_grpc.HooksStub(channel).Filter(iter(requests))
        out = []
        try:
            async for msg in call:
                kind = msg.WhichOneof("kind")
                out.append((kind, msg.released.text if kind == "released" else ""))
        except grpc.aio.AioRpcError as e:
            return out, e
        return out, None

    return asyncio.run(with_stage(chain, processor, body))


def test_lockstep_one_released_per_tokens_message(processor):
    ids = processor.tokenizer.encode("Hello there, friend.")
    out, error = exchange(FilterChain([Link(HoldAll(), name="hold")]), processor,
                          [start(), *[tokens(i) for i in ids], END])
    assert error is None
    assert out == [("released", "")] * len(ids) + [("released", "HELLO THERE, FRIEND."), ("end", "")]


def test_describe_lists_filters_and_tools(processor):
    def lookup(q: str) -> str:
        """Look something up."""
        return q

    chain = FilterChain([Link(HoldAll(), name="hold"), Link(Redact(words=["x"]), name="redact")], max_tool_steps=2,
                        tools=ToolRegistry([python_tool(lookup, parameters={"type": "object"})]))

    async def body(_, channel):
        return await hooks_pb2_grpc.HooksStub(channel).Describe(hooks_pb2.DescribeRequest())

    info = asyncio.run(with_stage(chain, processor, body))
    assert list(info.filters) == ["hold", "redact"] and info.max_tool_steps == 2
    assert [t["function"]["name"] for t in json.loads(info.tools_json)] == ["lookup"]


def test_a_request_can_pick_filters_by_name(processor):
    chain = FilterChain([Link(HoldAll(), name="hold"), Link(Redact(words=["hello"], replacement="bye"), name="redact")])
    ids = processor.tokenizer.encode("hello")
    out, error = exchange(chain, processor, [start(hooks=["redact"]), tokens(*ids), END])
    assert error is None and "".join(text for _, text in out) == "bye"  # not held, not upper-cased
    out, error = exchange(chain, processor, [start(hooks=["nope"])])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown text filter 'nope'" in error.details()
    assert "'hold', 'redact'" in error.details()


@pytest.mark.parametrize("requests, message", [
    ([tokens(1)], "the first message must be start"),
    ([start(conversation_json="{not json")], "conversation_json is not JSON"),
    ([start(conversation_json='[{"content": "no role"}]')], "list of chat messages"),
    ([start(), hooks_pb2.FilterRequest()], "expected tokens or thinker_end, got an empty message"),
    ([start(), tokens(1)], "ended before thinker_end"),
], ids=["no-start", "bad-json", "no-role", "empty-message", "no-thinker-end"])
def test_bad_messages_are_invalid_argument(processor, requests, message):
    # Nothing follows the message a stage rejects: a write racing the call's end reads as INTERNAL (grpc#36066).
    _, error = exchange(FilterChain([]), processor, requests)
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    assert message in error.details()


def test_a_failing_filter_fails_its_turn_only(engines, processor):
    chain = FilterChain([Link(Boom(), name="boom")])

    async def body(hooks, channel):
        with pytest.raises(Exception) as failed:
            coro, _ = run_turn(engines, hooks)
            await coro
        # the stage still serves (a turn without text never reaches the failing filter)
        out = [m async for m in hooks_pb2_grpc.HooksStub(channel).Filter(iter([start(), END]))]
        return failed.value, [m.WhichOneof("kind") for m in out]

    error, kinds = asyncio.run(with_stage(chain, processor, body))
    assert getattr(error, "code", None) == grpc.StatusCode.INTERNAL
    assert "text filter 'boom' failed: RuntimeError: it went boom" in str(error)
    assert kinds == ["released", "end"]


def test_a_conversation_over_the_message_limit_is_resource_exhausted(processor):
    """10 MB of text in a turn (or a session's history) would be one FilterStart over the stage's 8 MiB: refused
    before it is written, as RESOURCE_EXHAUSTED saying why (grpc.aio would report the refused write as INTERNAL)."""
    from services.errors import ResourceExhausted
    from services.hooks import HookContext

    async def body(hooks, _):
        ctx = HookContext(request_id="r", session_id="", metadata={},
                          conversation=[{"role": "user", "content": "a" * (9 << 20)}])
        with pytest.raises(ResourceExhausted, match=r"hooks stage would be one message of 9,4\d\d,\d\d\d bytes") as e:
            async with hooks.open(ctx):
                pass
        async with hooks.open(dataclasses.replace(ctx, conversation=[{"role": "user", "content": "hi"}])) as turn:
            released = await turn.thinker_end(stopped=True)  # the stage still serves
        return str(e.value), released

    message, released = asyncio.run(with_stage(FilterChain([]), processor, body))
    assert "send less text or start a new session" in message and released.text == ""
