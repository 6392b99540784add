"""The hook stage's SDK, built-in filters, registry and remote filters, on crafted token streams of the real Qwen
tokenizer. One harness: feed token ids to a chain's session, collect what it releases."""

from __future__ import annotations

import asyncio
import importlib.util
import time
import tomllib
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path

import grpc
import pytest

from services.errors import InvalidInput
from services.hooks import (
    Block,
    Blocklist,
    FilterChain,
    FilterFailed,
    FilterTurn,
    Hold,
    HookContext,
    Link,
    Redact,
    Release,
    Released,
    RemoteFilter,
    Sentences,
    TextFilter,
    build_chain,
)
from services.hooks import registry
from services.text import Detokenizer
from services.wire.gen.omni.v1 import text_filter_pb2_grpc
from services.wire.gen.omni.v1.text_filter_pb2 import TextVerdict

REPO = Path(__file__).resolve().parents[1]
IM_END = 151645
MIXED = "Grüße aus Zürich! 你好，世界。Party 🎉👍🏽 time… done."


@pytest.fixture(scope="module")
def tok():
    from services.checkpoint.tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer()


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def char_ids(tok, text: str) -> list[int]:
    """One token stream piece per character at most: every pattern is split at every possible place, and a
    multi-byte character often spans several byte-level tokens."""
    return [i for c in text for i in ids_of(tok, c)]


@dataclass
class Run:
    outs: list[Released]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outs)

    @property
    def ids(self) -> list[int]:
        return [i for o in self.outs for i in o.token_ids]

    @property
    def events(self):
        return [e for o in self.outs for e in o.events]

    @property
    def stopped(self) -> bool:
        return any(o.stop for o in self.outs)


async def run(chain: FilterChain, tok, ids: list[int], ctx: HookContext | None = None) -> Run:
    session = chain.session(ctx or HookContext(request_id="r"), tok)
    outs = [await session.feed(i) for i in ids]
    outs.append(await session.finish())
    return Run(outs)


class PassThrough(TextFilter):
    """The base class's defaults, and a record of what it was asked."""

    def __init__(self):
        self.seen: list[tuple[str, str]] = []

    async def on_text(self, text, turn):
        self.seen.append((text, turn.ahead))
        return await super().on_text(text, turn)


class Upper(TextFilter):
    async def on_text(self, text, turn):
        if "boom" in text:
            raise RuntimeError("it went boom")
        return Release(text.upper())


# --- the session -----------------------------------------------------------------------------------------------------


async def test_empty_chain_is_an_exact_pass_through(tok):
    ids = ids_of(tok, MIXED) + [IM_END]
    detok = Detokenizer(tok)
    session = FilterChain().session(HookContext(), tok)
    for i in ids:
        out = await session.feed(i)
        assert out.token_ids == [i] and out.text == detok.push([i]) and not out.events
    assert await session.finish() == Released()
    assert session.first_release_s is not None and session.overhead_s < 0.5


async def test_delaying_filters_release_the_thinkers_own_ids(tok):
    ids = ids_of(tok, "Hello there. 3.14 is pi! Grüße 🎉 aus Zürich") + [IM_END]
    r = await run(FilterChain([Link(PassThrough(), "ahead", lookahead=3), Sentences()]), tok, ids)
    assert r.ids == ids and r.text == tok.decode(ids, skip_special_tokens=True)
    released = [o.text for o in r.outs if o.text]
    assert released[0] == "Hello there." and released[1] == " 3.14 is pi!"  # not split after "3."


async def test_a_rewrite_re_encodes_the_released_text(tok):
    r = await run(FilterChain([Redact(words=["x"], replacement="<|im_end|>")]), tok, ids_of(tok, "say x ok"))
    assert r.text == "say <|im_end|> ok"
    assert IM_END not in r.ids and tok.decode(r.ids) == r.text  # spelled out, never the special token


async def test_lookahead_shows_the_next_pieces(tok):
    seer = PassThrough()
    ids = ids_of(tok, "one two three four five")
    r = await run(FilterChain([Link(seer, "seer", lookahead=2)]), tok, ids)
    assert r.ids == ids
    assert seer.seen[0] == ("one", " two three") and seer.seen[-1] == (" five", "")
    assert [bool(o.text) for o in r.outs[:3]] == [False, False, True]  # held back two pieces


async def test_hold_joins_the_next_piece_and_end_drops_what_is_kept(tok):
    class Pairs(TextFilter):  # releases two words at a time
        async def on_text(self, text, turn):
            return Release(text) if text.count(" ") >= 2 else Hold()

        async def on_end(self, text, turn):
            return Release(text + "!", keep="never seen")

    r = await run(FilterChain([Pairs()]), tok, ids_of(tok, " a b c"))
    assert [o.text for o in r.outs] == ["", " a b", "", " c!"]


# --- built-in filters ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", [ids_of, char_ids])
async def test_redact_across_token_boundaries_and_case(tok, split):
    redact = Redact(words=["john smith", "Müller"], patterns=[r"\d{3}-\d{4}"], replacement="[x]", ignore_case=True)
    text = "Call JOHN Smith or herr MÜLLER at 555-1234, not Müllers or johnsmith. Done 🎉"
    r = await run(FilterChain([redact]), tok, split(tok, text))
    assert r.text == "Call [x] or herr [x] at [x], not Müllers or johnsmith. Done 🎉"
    assert tok.decode(r.ids) == r.text
    assert sum(e.data["count"] for e in r.events if e.type == "redacted") == 3
    assert all(e.hook == "redact" and "john" not in e.message.lower() for e in r.events)


async def test_redact_is_case_sensitive_by_default_and_handles_unicode(tok):
    r = await run(FilterChain([Redact(patterns=["secret", "你好"], words=["🎉"])]), tok,
                  char_ids(tok, "SECRET secret 你好世界 🎉🎉!"))
    assert r.text == "SECRET [redacted] [redacted]世界 [redacted][redacted]!"


@pytest.mark.parametrize("split", [ids_of, char_ids])
async def test_words_in_scripts_written_without_spaces(tok, split):
    """Chinese has no spaces: its words match inside running text, and a Latin word next to it still ends there;
    a word glued to Latin letters or digits does not match."""
    redact = Redact(words=["railway", "密码"], replacement="[x]")
    r = await run(FilterChain([redact]), tok, split(tok, "railway美化, 我的密码是 railways railway2 密码"))
    assert r.text == "[x]美化, 我的[x]是 railways railway2 [x]"
    with pytest.raises(InvalidInput, match="matches empty text"):
        Redact(words=[""])


async def test_redact_releases_a_very_long_word_as_it_comes(tok):
    ids = ids_of(tok, "x" * 6000)
    session = FilterChain([Redact(words=["secret"])]).session(HookContext(), tok)
    released = "".join([(await session.feed(i)).text for i in ids])
    assert len(released) >= 6000 - 20  # nothing like a partial match, so nothing waits
    assert released + (await session.finish()).text == "x" * 6000


async def test_redact_with_lookahead_sees_longer_matches(tok):
    text = "xabcd"
    plain = await run(FilterChain([Redact(patterns=["abcd|a"], replacement="_")]), tok, char_ids(tok, text))
    ahead = await run(FilterChain([Link(Redact(patterns=["abcd|a"], replacement="_"), "r", lookahead=3)]), tok,
                      char_ids(tok, text))
    assert plain.text == "x_bcd"  # "a" matched before "bcd" could be seen
    assert ahead.text == "x_"


@pytest.mark.parametrize("split", [ids_of, char_ids])
async def test_blocklist_stops_with_the_fallback(tok, split):
    chain = FilterChain([Sentences(), Blocklist(words=["bomb"], ignore_case=True, reason="weapons")],
                        fallback="Let's talk about something else.")
    ids = split(tok, "Sure. First you build a BoMb from parts. Then more.")
    session = chain.session(HookContext(), tok)
    outs = []
    for i in ids:
        outs.append(await session.feed(i))
        if outs[-1].stop:
            break
    r = Run(outs)
    assert r.text == "Sure. Let's talk about something else."
    assert outs[-1].stop and outs[-1].token_ids == ids_of(tok, " Let's talk about something else.")
    assert [(e.hook, e.type, e.message) for e in r.events] == [("blocklist", "blocked", "weapons")]
    assert await session.feed(ids[-1]) == Released(stop=True) and await session.finish() == Released(stop=True)


async def test_blocklist_at_the_very_end_and_its_own_fallback(tok):
    r = await run(FilterChain([Blocklist(patterns=["fin$"], fallback="[cut]")]), tok, ids_of(tok, "the fin"))
    assert r.stopped and r.text == "the [cut]"


async def test_sentences_on_unicode_and_long_runs(tok):
    text = "你好。好的！Ok... yes\nno " + "y" * 200
    r = await run(FilterChain([Sentences(max_chars=50)]), tok, ids_of(tok, text))
    released = [o.text for o in r.outs if o.text]
    assert released[:3] == ["你好。", "好的！", "Ok..."] and " yes\n" in released
    assert r.text.endswith("y" * 200) and len(released) >= 5


@pytest.mark.parametrize("bad", [dict(), dict(patterns=["("]), dict(patterns=["x*"])])
def test_matcher_rejects_bad_options(bad):
    with pytest.raises(InvalidInput):
        Redact(**bad)


# --- failures --------------------------------------------------------------------------------------------------------


class Counted(TextFilter):
    def __init__(self):
        self.started = self.stopped = 0

    async def start(self, turn):
        self.started += 1
        turn.state = []

    async def stop(self, turn):
        self.stopped += 1


async def test_a_raising_filter_fails_its_request_only(tok):
    counted = Counted()
    chain = FilterChain([counted, Link(Upper(), "upper", on_error="fail")])

    async def feed_slowly(text):
        session = chain.session(HookContext(request_id=text), tok)
        out = ""
        for i in ids_of(tok, text):
            out += (await session.feed(i)).text
            await asyncio.sleep(0)  # interleave the two requests
        return out + (await session.finish()).text

    failed, calm = await asyncio.gather(feed_slowly("this goes boom now"), feed_slowly("all calm here, all fine"),
                                        return_exceptions=True)
    assert isinstance(failed, FilterFailed) and "'upper'" in str(failed) and "it went boom" in str(failed)
    assert calm == "ALL CALM HERE, ALL FINE"
    assert counted.started == counted.stopped == 2


async def test_a_raising_filter_is_skipped_by_policy(tok):
    r = await run(FilterChain([Link(Upper(), "upper", on_error="skip")]), tok, ids_of(tok, "this goes boom now"))
    assert r.text == "THIS GOES boom now"
    assert [(e.hook, e.type) for e in r.events] == [("upper", "filter_skipped")]
    assert "it went boom" in r.events[0].message


async def test_a_filter_answering_nonsense_fails_clearly(tok):
    class Wrong(TextFilter):
        async def on_text(self, text, turn):
            return text

    with pytest.raises(FilterFailed, match="expected Release, Hold or Block"):
        await run(FilterChain([Wrong()]), tok, ids_of(tok, "hi"))


async def test_overhead_and_first_release_are_measured(tok):
    from prometheus_client import REGISTRY

    ids = ids_of(tok, MIXED * 10)
    chain = FilterChain([Redact(words=["secret", "password"]), Sentences(), Blocklist(words=["bomb"])])
    session = chain.session(HookContext(), tok)
    for i in ids:
        await session.feed(i)
    await session.finish()
    assert session.overhead_s / len(ids) < 0.005  # per token; the frame budget is 80 ms
    assert 0 < session.first_release_s < 1
    assert REGISTRY.get_sample_value("omni_hook_overhead_seconds_count") >= len(ids)
    assert REGISTRY.get_sample_value("omni_hook_time_to_first_release_seconds_count") >= 1


# --- registry --------------------------------------------------------------------------------------------------------


def test_build_chain_from_config(monkeypatch, tok):
    fake = [EntryPoint("redact", "services.hooks.builtin:Redact", registry.FILTERS_GROUP)]
    monkeypatch.setattr(registry, "entry_points",
                        lambda group, name=None: [e for e in fake if e.group == group and name in (None, e.name)])
    chain = build_chain({
        "fallback": "no.",
        "max_tool_steps": 2,
        "filters": [
            {"use": "redact", "options": {"words": ["acme"], "replacement": "[co]", "ignore_case": True}},
            {"use": "services.hooks.builtin:Sentences", "name": "sent", "lookahead": 1, "on_error": "skip"},
        ],
    })
    assert [(ln.name, type(ln.filter).__name__, ln.on_error, ln.lookahead) for ln in chain.links] == [
        ("redact", "Redact", "fail", 0), ("sent", "Sentences", "skip", 1)]
    assert chain.fallback == "no." and chain.max_tool_steps == 2 and len(chain.tools) == 0
    with pytest.raises(InvalidInput, match="redact"):  # the known names are listed
        build_chain({"filters": [{"use": "nope"}]})
    with pytest.raises(InvalidInput, match="not a TextFilter"):
        build_chain({"filters": [{"use": "services.hooks.sdk:HookContext"}]})
    with pytest.raises(InvalidInput, match="bad options"):
        build_chain({"filters": [{"use": "services.hooks.builtin:Redact", "options": {"wrods": ["x"]}}]})
    with pytest.raises(InvalidInput, match="cannot load"):
        build_chain({"filters": [{"use": "services.hooks.nothing:X"}]})


def test_pyproject_declares_the_builtins_as_entry_points():
    groups = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("entry-points", {})
    declared = {g: dict(eps) for g, eps in groups.items()}
    assert declared.get(registry.FILTERS_GROUP) == {
        "redact": "services.hooks.builtin:Redact", "block": "services.hooks.builtin:Blocklist",
        "sentences": "services.hooks.builtin:Sentences", "remote": "services.hooks.remote:RemoteFilter"}
    assert declared.get(registry.TOOLS_GROUP) == {"retrieve": "services.hooks.tools:Retrieve"}
    for ref in [*declared[registry.FILTERS_GROUP].values(), *declared[registry.TOOLS_GROUP].values()]:
        registry.load(ref)


# --- remote filters --------------------------------------------------------------------------------------------------


def _example_server():
    spec = importlib.util.spec_from_file_location("remote_filter_server", REPO / "examples/remote_filter_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Scripted(text_filter_pb2_grpc.TextFilterServicer):
    """Records the start; then answers per `mode`: "hang" (never), "empty" (a message that is no verdict)."""

    def __init__(self, mode: str):
        self.mode, self.starts = mode, []

    async def Filter(self, request_iterator, context):
        async for request in request_iterator:
            if request.HasField("start"):
                self.starts.append(request.start)
            elif self.mode == "hang":
                await asyncio.sleep(3600)
            else:
                yield TextVerdict()


async def _serve(add) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_remote_filter_from_the_example_server(tok):
    server, port = await _example_server().serve("127.0.0.1:0")
    try:
        chain = build_chain({"filters": [{"use": "services.hooks.remote:RemoteFilter", "name": "mask",
                                          "options": {"target": f"127.0.0.1:{port}", "deadline_s": 2.0}}]})
        r = await run(chain, tok, char_ids(tok, "What the HECK, darn it. Heckle! 你好"))
        assert r.text == "What the H***, d*** it. Heckle! 你好"
        assert [(e.hook, e.type) for e in r.events] == [("mask", "masked"), ("mask", "masked")]
        assert tok.decode(r.ids) == r.text
    finally:
        await server.stop(0)


async def test_remote_filter_gets_the_request_context(tok):
    scripted = Scripted("empty")
    server, target = await _serve(lambda s: text_filter_pb2_grpc.add_TextFilterServicer_to_server(scripted, s))
    try:
        ctx = HookContext(request_id="r1", session_id="s1", metadata={"user": "u"},
                          conversation=[{"role": "user", "content": [{"type": "audio", "audio": "x"},
                                                                     {"type": "text", "text": "hi"}]}])
        chain = FilterChain([Link(RemoteFilter(target, params={"level": 2}, on_failure="fail_open"), "scripted")])
        r = await run(chain, tok, ids_of(tok, "hello there"), ctx)
        start = scripted.starts[0]
        assert (start.request_id, start.session_id, dict(start.metadata), start.params) == \
            ("r1", "s1", {"user": "u"}, '{"level": 2}')
        assert [(m.role, m.text) for m in start.conversation] == [("user", "hi")]
        # an answer that is no verdict: fail open, once, and the rest passes unfiltered
        assert r.text == "hello there" and [e.type for e in r.events] == ["filter_failed_open"]
        assert "not a verdict" in r.events[0].message
    finally:
        await server.stop(0)


@pytest.mark.parametrize("policy", ["fail_open", "fail_closed"])
async def test_remote_filter_that_hangs_meets_its_deadline(tok, policy):
    server, target = await _serve(
        lambda s: text_filter_pb2_grpc.add_TextFilterServicer_to_server(Scripted("hang"), s))
    try:
        chain = FilterChain([Link(RemoteFilter(target, deadline_s=0.2, on_failure=policy), "guard")], fallback="No.")
        t0 = time.perf_counter()
        r = await run(chain, tok, ids_of(tok, "one two three"))
        assert time.perf_counter() - t0 < 2  # one deadline, then the policy holds for the request
        if policy == "fail_open":
            assert r.text == "one two three" and not r.stopped
            assert [e.type for e in r.events] == ["filter_failed_open"]
        else:
            assert r.text == "No." and r.stopped
            assert [(e.hook, e.type) for e in r.events] == [("guard", "blocked")]
        assert "deadline of 0.2 s" in r.events[0].message
    finally:
        await server.stop(0)


async def test_remote_filter_answering_garbage_bytes(tok):
    async def garbage(request_iterator, context):
        async for _ in request_iterator:
            yield b"\xff\xfe not a protobuf \x00\x01"

    handler = grpc.method_handlers_generic_handler(
        "omni.v1.TextFilter", {"Filter": grpc.stream_stream_rpc_method_handler(garbage)})
    server, target = await _serve(lambda s: s.add_generic_rpc_handlers((handler,)))
    try:
        r = await run(FilterChain([RemoteFilter(target, on_failure="fail_closed")], fallback="No."), tok,
                      ids_of(tok, "hello"))
        assert r.stopped and r.text == "No."
        assert "not a TextVerdict" in r.events[0].message
    finally:
        await server.stop(0)


async def test_remote_filter_that_is_down(tok):
    r = await run(FilterChain([RemoteFilter("127.0.0.1:1", on_failure="fail_open", deadline_s=1.0)]), tok,
                  ids_of(tok, "still here"))
    assert r.text == "still here" and r.events[0].type == "filter_failed_open"
    assert "UNAVAILABLE" in r.events[0].message or "deadline" in r.events[0].message


async def test_remote_tool_from_the_example_server():
    from services.hooks import ToolCall, ToolRegistry, grpc_tool, run_tools

    server, port = await _example_server().serve("127.0.0.1:0")
    try:
        tool = grpc_tool(f"127.0.0.1:{port}", name="convert_temperature", description="C to F",
                         parameters={"type": "object", "properties": {"celsius": {"type": "number"}}})
        messages = await run_tools([ToolCall("convert_temperature", {"celsius": 100}),
                                    ToolCall("convert_temperature", {"celsius": "hot"})],
                                   ToolRegistry([tool]), HookContext())
        assert messages[0] == {"role": "tool", "content": '{"fahrenheit": 212.0}'}
        assert "INVALID_ARGUMENT" in messages[1]["content"] and "error" in messages[1]["content"]
    finally:
        await server.stop(0)


def test_filter_turn_events_carry_the_link_name():
    events = []
    FilterTurn("mine", HookContext(), events).emit("noted", "hi", n=1)
    assert [(e.hook, e.type, e.message, dict(e.data)) for e in events] == [("mine", "noted", "hi", {"n": 1})]
    assert Block("why").fallback is None and Release("a").keep == ""
