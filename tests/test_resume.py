"""What a stage stream resumed on another replica is sent again and gives its caller (services/serving/resume.py);
the whole path, replicas killed mid-turn, is tests/test_failover.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from services.hooks import HookEvent, Released
from services.serving.resume import Replay, SeenItems, SeenSamples, past
from services.servicers.status import StageError


async def _source(items, gate: asyncio.Event, fail: Exception | None = None):
    for i, item in enumerate(items):
        if i == 2:
            await gate.wait()  # the third item is slow: a consumer is cancelled while it waits
        yield item
    if fail is not None:
        raise fail


async def test_a_replay_gives_each_reader_everything_from_the_start_and_reads_the_source_once():
    gate, pulled = asyncio.Event(), []

    async def source():
        async for item in _source([10, 11, 12, 13], gate):
            pulled.append(item)
            yield item

    replay = Replay(source())
    first, got = replay.reader(), []
    got.append(await anext(first))
    got.append(await anext(first))
    reading = asyncio.ensure_future(anext(first))
    await asyncio.sleep(0.01)
    reading.cancel()  # the call reading it died mid-read
    with pytest.raises(asyncio.CancelledError):
        await reading
    gate.set()
    assert [item async for item in replay.reader()] == [10, 11, 12, 13]  # the resumed call gets it all
    assert got == [10, 11] and pulled == [10, 11, 12, 13]  # and the source was read once
    await replay.close()


async def test_a_replay_passes_the_sources_error_to_every_reader():
    gate = asyncio.Event()
    gate.set()
    replay = Replay(_source([1, 2, 3], gate, fail=ValueError("the Thinker failed")))
    for _ in range(2):
        with pytest.raises(ValueError, match="the Thinker failed"):
            [item async for item in replay.reader()]


async def test_closing_a_replay_mid_read_cancels_the_sources_read():
    gate = asyncio.Event()
    replay = Replay(_source([1, 2, 3], gate))
    reader = replay.reader()
    await anext(reader), await anext(reader)
    reading = asyncio.ensure_future(anext(reader))
    await asyncio.sleep(0.01)
    reading.cancel()
    await replay.close()
    assert replay._next.cancelled()


def test_seen_items_drops_what_the_caller_had_and_refuses_a_different_answer():
    seen = SeenItems("talker", key=lambda codes: codes)
    frames = [(i, i + 1) for i in range(4)]
    assert [seen.new(f) is f for f in frames[:2]] == [True, True]
    seen.rewind()  # resumed: the survivor starts again from the first frame
    assert [seen.new(f) for f in frames[:2]] == [None, None]
    assert [seen.new(f) is f for f in frames[2:]] == [True, True]
    seen.rewind()
    with pytest.raises(StageError, match="answered otherwise") as e:
        seen.new((9, 9))
    assert e.value.code == grpc.StatusCode.ABORTED  # not UNAVAILABLE: no other replica is tried


def test_seen_samples_gives_the_samples_past_those_had_whatever_the_chunks():
    seen, wave = SeenSamples(), torch.arange(10.0)
    got = [seen.new(wave[:4]), seen.new(wave[4:7])]
    seen.rewind()
    got += [seen.new(wave[:5]), seen.new(wave[5:6]), seen.new(wave[6:10])]  # chunked otherwise on the survivor
    assert got[2] is None and got[3] is None and torch.equal(got[4], wave[7:])
    assert torch.equal(torch.cat([g for g in got if g is not None]), wave)


def test_past_releases_what_a_resumed_hook_stream_has_beyond_what_the_turn_had():
    given = Released(token_ids=[1, 2], text="ab", events=[HookEvent(hook="redact", type="redacted")])
    answer = Released(token_ids=[1, 2, 3], text="abc", events=[HookEvent(hook="redact", type="redacted")], resume=[7])
    new = past(given, answer)
    assert (new.token_ids, new.text, new.events, new.resume) == ([3], "c", [], [7])
    with pytest.raises(StageError, match="released text"):
        past(given, Released(token_ids=[1, 5], text="ae"))
