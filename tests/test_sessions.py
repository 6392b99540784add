"""Session stores: the in-process one and Redis (a real redis-server on a free port), and a conversation continued
across two gateway instances that share one Redis."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
import uuid

import grpc
import numpy as np
import pytest
import soundfile as sf

from services.client import ConverseError, OmniClient
from services.conductor import Conductor, TurnRequest
from services.engines.bundle import Engines
from services.engines.sampling import SamplingParams
from services.errors import InvalidInput
from services.events import AudioChunk, float_to_pcm16
from services.gateway import OmniServicer, start_gateway
from services.sessions import (
    History,
    InProcessSessions,
    Quotas,
    RedisSessions,
    SessionStoreError,
    encode_message,
    make_session_store,
)
from services.stages import Stages
from services.turn_parts import audio_part, text_part
from tests.helpers import LoopThread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not on PATH (apt-get install redis-server; .ci/run installs it)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client, deadline = redis.Redis.from_url(url), time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    client.close()
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(params=["in-process", "redis"])
def make_store(request):
    """A factory of empty stores of one kind (Redis stores get their own key prefix)."""
    if request.param == "in-process":
        return lambda **kw: InProcessSessions(**kw)
    url = request.getfixturevalue("redis_url")
    prefix = f"test:{uuid.uuid4().hex}:"
    return lambda **kw: RedisSessions(url, prefix=prefix, **kw)


def said(i: int) -> dict:
    return {"role": "user", "content": f"turn {i}"}


def user_turn(i: int) -> dict:
    """A user message with every kind of stored media: encoded bytes, PCM arrays, a video with a track."""
    pcm = (np.arange(1600, dtype=np.int16) * (i + 1)).reshape(-1, 2)
    return {"role": "user", "content": [
        {"type": "audio", "audio": b"RIFF fake wav bytes %d" % i},
        {"type": "audio", "audio": pcm, "sample_rate": 8000},
        {"type": "image", "image": bytes([i, 0, 255])},
        {"type": "video", "video": {"frames": [b"frame0", b"frame1"], "timestamps": [0.0, 0.5],
                                    "audio": pcm[:, 0].copy(), "audio_sample_rate": 8000}},
        {"type": "text", "text": f"question {i} ✓"},
    ]}


def same(a: list[dict], b: list[dict]) -> bool:
    return [encode_message(m) for m in a] == [encode_message(m) for m in b]


async def test_append_and_load_keep_media_and_the_system_prompt(make_store):
    store = make_store()
    try:
        assert await store.load("s") == History()
        turn1 = [user_turn(0), {"role": "assistant", "content": "answer 0"}]
        await store.append("s", turn1, system="Be brief.")
        loaded = await store.load("s")
        assert loaded.system == "Be brief." and same(loaded.messages, turn1)
        pcm = loaded.messages[0]["content"][1]["audio"]
        assert pcm.dtype == np.int16 and pcm.shape == (800, 2)

        turn2 = [user_turn(1), {"role": "assistant", "content": "answer 1"}]
        await store.append("s", turn2)  # no system: the session's stays
        loaded = await store.load("s")
        assert loaded.system == "Be brief." and same(loaded.messages, turn1 + turn2)
        assert loaded.conversation()[0] == {"role": "system", "content": "Be brief."}

        await store.append("s", [], system="Be verbose.")
        assert (await store.load("s")).system == "Be verbose."
        assert await store.load("other") == History()
        await store.delete("s")
        assert await store.load("s") == History()
    finally:
        await store.close()


async def test_a_session_expires_ttl_after_its_last_turn(make_store):
    store = make_store(ttl_s=0.3)
    try:
        await store.append("s", [{"role": "user", "content": "hi"}], system="x")
        await asyncio.sleep(0.2)
        await store.append("s", [{"role": "assistant", "content": "hello"}])  # resets the TTL
        await asyncio.sleep(0.2)
        assert len((await store.load("s")).messages) == 2
        await asyncio.sleep(0.4)
        assert await store.load("s") == History()
    finally:
        await store.close()


async def test_concurrent_turns_of_one_session_never_interleave(make_store):
    store = make_store()
    try:
        await asyncio.gather(*(store.append("s", [{"role": "user", "content": f"q{i}"},
                                                  {"role": "assistant", "content": f"a{i}"}]) for i in range(10)))
        messages = (await store.load("s")).messages
        assert len(messages) == 20
        for user, assistant in zip(messages[::2], messages[1::2]):
            assert user["content"][1:] == assistant["content"][1:]
    finally:
        await store.close()


async def test_session_id_length_is_bounded(make_store):
    store = make_store()
    try:
        with pytest.raises(InvalidInput, match="session_id"):
            await store.load("x" * 1000)
    finally:
        await store.close()


async def test_in_process_store_evicts_the_least_recently_used():
    store = InProcessSessions(max_sessions=2)
    for sid in ("a", "b"):
        await store.append(sid, [{"role": "user", "content": sid}])
    await store.load("a")  # a is now more recent than b
    await store.append("c", [{"role": "user", "content": "c"}])
    assert await store.load("b") == History()
    assert (await store.load("a")).messages and (await store.load("c")).messages


async def test_a_session_belongs_to_its_owner(make_store):
    store = make_store()
    try:
        await store.append("shared", [said(0)], system="alice's prompt", owner="alice")
        assert await store.load("shared", owner="bob") == History()  # same id, another tenant: nothing to read
        assert await store.load("shared") == History()  # nor without a principal (authentication off)
        await store.append("shared", [said(1)], owner="bob")
        alice, bob = await store.load("shared", owner="alice"), await store.load("shared", owner="bob")
        assert alice.system == "alice's prompt" and len(alice.messages) == 1 and alice.nbytes > 0
        assert bob.system is None and bob.messages == [said(1)]
        # Owners whose names would join into the same key: still apart.
        await store.append("b/c", [said(2)], owner="a")
        assert await store.load("c", owner="a/b") == History()
    finally:
        await store.close()


async def test_one_owner_cannot_evict_another(make_store):
    """The attack of many anonymous one-turn sessions: beyond its quota an owner loses its own oldest sessions
    (count or bytes), never another owner's."""
    store = make_store(quotas=Quotas(max_sessions_per_owner=3, max_bytes_per_owner=4000, max_session_bytes=4000))
    try:
        await store.append("keep", [said(0)], owner="victim")
        for i in range(8):
            await store.append(f"s{i}", [said(i)], owner="flood")
        assert (await store.load("keep", owner="victim")).messages == [said(0)]
        kept = [i for i in range(8) if (await store.load(f"s{i}", owner="flood")).messages]
        assert kept == [5, 6, 7]  # the flooder's newest three
        big = {"role": "user", "content": [{"type": "audio", "audio": bytes(1500)}]}
        for sid in ("b0", "b1", "b2"):
            await store.append(sid, [big], owner="flood")  # 3 x 1500 bytes > 4000: the oldest goes
        assert [sid for sid in ("b0", "b1", "b2") if (await store.load(sid, owner="flood")).messages] == ["b1", "b2"]
        assert (await store.load("keep", owner="victim")).messages == [said(0)]
    finally:
        await store.close()


async def test_in_process_store_bounds_its_bytes():
    store = InProcessSessions(max_bytes=10_000)
    media = {"role": "user", "content": [{"type": "image", "image": bytes(4000)}]}
    for i in range(4):
        await store.append(f"s{i}", [media], owner=f"tenant{i}")
    assert [i for i in range(4) if (await store.load(f"s{i}", owner=f"tenant{i}")).messages] == [2, 3]
    assert sum(h.nbytes for _, h in store._sessions.values()) <= 10_000


async def test_unreachable_redis_is_a_session_store_error():
    store = RedisSessions(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(SessionStoreError, match="cannot load the session store"):
            await store.load("s")
    finally:
        await store.close()


def test_make_session_store(redis_url):
    assert isinstance(make_session_store(None), InProcessSessions)
    store = make_session_store(redis_url, ttl_s=60)
    assert isinstance(store, RedisSessions) and store.ttl_s == 60
    asyncio.run(store.close())


# ---- gateways sharing one Redis --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tiny_ckpt):
    return Stages.local(Engines.load(tiny_ckpt))


@pytest.fixture(scope="module")
def gateways(stages, redis_url):
    """Addresses of two gateways whose sessions live in the same Redis, and of one whose Redis is down."""
    loop = LoopThread()
    stores = [RedisSessions(redis_url) for _ in range(2)] + [RedisSessions(f"redis://127.0.0.1:{free_port()}/0")]
    servers = [loop.run(start_gateway(OmniServicer(stages, store))) for store in stores]
    yield [f"127.0.0.1:{port}" for _, port in servers]
    for (server, _), store in zip(servers, stores):
        loop.run(server.stop(None))
        loop.run(store.close())
    loop.stop()


def reference(stages, req: TurnRequest) -> tuple[list[int], list[list[int]], np.ndarray, str]:
    async def run():
        events = [e async for e in Conductor(stages).run(req)]
        samples = np.concatenate([e.samples for e in events if isinstance(e, AudioChunk)])
        return events[-1], samples

    summary, samples = asyncio.run(run())
    return summary.thinker_token_ids, summary.codes, float_to_pcm16(samples), summary.text


def test_a_session_continues_on_another_gateway(gateways, stages, tmp_path):
    a, b, _ = gateways
    t = np.arange(int(1.3 * 16000)) / 16000
    sf.write(tmp_path / "chirp.wav", (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32), 16000)
    wav = (tmp_path / "chirp.wav").read_bytes()
    greedy = dict(greedy=True, max_new_tokens=8, max_audio_frames=24)
    session = f"shared-{uuid.uuid4().hex}"
    sampling = SamplingParams(greedy=True)

    turns = [(a, dict(text="Listen to this.", audios=[wav])), (b, dict(text="Again, please.")),
             (a, dict(text="Thanks."))]
    history: list[dict] = []
    for address, turn in turns:
        summary, samples = OmniClient(address).converse_sync(session_id=session, **turn, **greedy)
        ids, codes, pcm, text = reference(stages, TurnRequest(
            history=list(history), parts=[*map(audio_part, turn.get("audios", ())), text_part(turn["text"])],
            thinker_sampling=sampling, max_new_tokens=8, max_audio_frames=24))
        assert summary.thinker_token_ids == ids and summary.codes == codes and summary.text == text
        np.testing.assert_array_equal(float_to_pcm16(samples), pcm)
        media = [{"type": "audio", "audio": w} for w in turn.get("audios", ())]
        history += [{"role": "user", "content": [*media, {"type": "text", "text": turn["text"]}]},
                    {"role": "assistant", "content": text}]


def test_redis_down_is_unavailable_and_the_gateway_keeps_serving(gateways):
    down = gateways[2]
    with pytest.raises(ConverseError) as info:
        OmniClient(down).converse_sync(text="hi", session_id="s", greedy=True, max_new_tokens=2)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "session store" in info.value.details
    summary, _ = OmniClient(down).converse_sync(text="hi", greedy=True, audio_output=False, max_new_tokens=2)
    assert len(summary.thinker_token_ids) == 2
