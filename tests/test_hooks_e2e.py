"""Issue 5 end to end over gRPC: a `redact` or `block` filter changes what the client reads and what the Talker
speaks, identically; hook events reach the client. The chain runs in the gateway, or in the hook stage's own gRPC
server that the gateway calls (as the hooks application in a deployment)."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from services.client import OmniClient
from services.engines.bundle import Engines
from services.events import HookEvent, TextDelta, TurnSummary
from services.gateway import OmniServicer, start_gateway
from services.hooks import Blocklist, FilterChain, Link, Redact
from services.remote import RemoteHooks
from services.servicers import serve_stage
from services.servicers.hooks import HooksServicer
from services.sessions import InProcessSessions
from services.stages import Stages
from tests.helpers import LoopThread, SpyTalker, a_word

ASK = dict(text="Tell me something.", greedy=True, max_new_tokens=20, max_audio_frames=40)


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return Engines.load(tiny_ckpt)


@pytest.fixture(scope="module")
def loop():
    loop = LoopThread()
    yield loop
    loop.stop()


def serve(loop, engines, hooks, where):
    """A gateway with `hooks` (in the gateway, or `where="stage"`: in a hook stage server it calls), whose Talker
    records the token ids it is given. Returns a stop function, the address and the spy."""
    stages = Stages.local(engines)
    spy = SpyTalker(stages.talker)
    stops = []
    if where == "stage" and hooks is not None:
        hooks_server, hooks_port = loop.run(serve_stage(HooksServicer(hooks, engines.processor), host="127.0.0.1"))

        async def client():
            return RemoteHooks(grpc.aio.insecure_channel(f"127.0.0.1:{hooks_port}"))

        hooks = loop.run(client())
        stops += [hooks.channel.close(), hooks_server.stop(None)]
    servicer = OmniServicer(dataclasses.replace(stages, talker=spy), InProcessSessions(), hooks=hooks)
    server, port = loop.run(start_gateway(servicer))

    def stop():
        for coro in [server.stop(None), *stops]:
            loop.run(coro)

    return stop, f"127.0.0.1:{port}", spy


async def converse(address):
    events = [e async for e in OmniClient(address).converse(**ASK)]
    assert isinstance(events[-1], TurnSummary)
    return events


@pytest.mark.parametrize("where", ["gateway", "stage"])
def test_redact_and_block_over_grpc(loop, engines, processor, where):
    import asyncio

    stop, address, spy = serve(loop, engines, None, where)
    plain = asyncio.run(converse(address))
    stop()
    word = a_word(plain[-1].text)
    assert word in processor.tokenizer.decode(spy.received)

    redact = FilterChain([Link(Redact(words=[word], replacement="[redacted]"), name="redact")])
    stop, address, spy = serve(loop, engines, redact, where)
    events = asyncio.run(converse(address))
    stop()
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert word not in text and "[redacted]" in text and text == events[-1].text
    assert word not in processor.tokenizer.decode(spy.received)
    assert any(isinstance(e, HookEvent) and e.hook == "redact" for e in events)
    assert events[-1].codes != plain[-1].codes

    block = FilterChain([Link(Blocklist(words=[word], fallback="Let us change the subject."), name="block")])
    stop, address, spy = serve(loop, engines, block, where)
    events = asyncio.run(converse(address))
    stop()
    summary = events[-1]
    assert summary.finish_reason == "blocked"
    assert word not in summary.text and "Let us change the subject." in summary.text
    assert "Let us change the subject." in processor.tokenizer.decode(spy.received)
