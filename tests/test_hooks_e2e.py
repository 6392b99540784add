"""Issue 5 end to end over gRPC: a `redact` or `block` filter in the gateway's chain changes what the client reads
and what the Talker speaks, identically; hook events reach the client."""

from __future__ import annotations

import dataclasses

import pytest

from services.client import OmniClient
from services.engines.bundle import Engines
from services.events import HookEvent, TextDelta, TurnSummary
from services.gateway import OmniServicer, start_gateway
from services.hooks import Blocklist, FilterChain, Link, Redact
from services.sessions import InProcessSessions
from services.stages import Stages
from tests.helpers import LoopThread, SpyTalker

ASK = dict(text="Tell me something.", greedy=True, max_new_tokens=20, max_audio_frames=40)


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return Engines.load(tiny_ckpt)


@pytest.fixture(scope="module")
def loop():
    loop = LoopThread()
    yield loop
    loop.stop()


def serve(loop, engines, hooks):
    """A gateway with `hooks`, whose Talker records the token ids it is given."""
    stages = Stages.local(engines)
    spy = SpyTalker(stages.talker)
    servicer = OmniServicer(dataclasses.replace(stages, talker=spy), InProcessSessions(), hooks=hooks)
    server, port = loop.run(start_gateway(servicer))
    return server, f"127.0.0.1:{port}", spy


async def converse(address):
    events = [e async for e in OmniClient(address).converse(**ASK)]
    assert isinstance(events[-1], TurnSummary)
    return events


def test_redact_and_block_over_grpc(loop, engines, processor):
    import asyncio

    server, address, spy = serve(loop, engines, hooks=None)
    plain = asyncio.run(converse(address))
    loop.run(server.stop(None))
    words = [w for w in plain[-1].text.split() if len(w) >= 4 and w.isalpha()]
    assert words, plain[-1].text
    word = words[0]
    assert word in processor.tokenizer.decode(spy.received)

    redact = FilterChain([Link(Redact(words=[word], replacement="[redacted]"), name="redact")])
    server, address, spy = serve(loop, engines, hooks=redact)
    events = asyncio.run(converse(address))
    loop.run(server.stop(None))
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert word not in text and "[redacted]" in text and text == events[-1].text
    assert word not in processor.tokenizer.decode(spy.received)
    assert any(isinstance(e, HookEvent) and e.hook == "redact" for e in events)
    assert events[-1].codes != plain[-1].codes

    block = FilterChain([Link(Blocklist(words=[word], fallback="Let us change the subject."), name="block")])
    server, address, spy = serve(loop, engines, hooks=block)
    events = asyncio.run(converse(address))
    loop.run(server.stop(None))
    summary = events[-1]
    assert summary.finish_reason == "blocked"
    assert word not in summary.text and "Let us change the subject." in summary.text
    assert "Let us change the subject." in processor.tokenizer.decode(spy.received)
