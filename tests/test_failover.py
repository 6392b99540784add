"""A stage replica killed mid-turn (SIGKILL, on a real local Ray cluster) while a second replica runs: the turn
completes with the ids, codes and samples of an undisturbed run. Calls that hold no state on a replica (MTP frames)
go to the survivor (`ReplicaSet.call`); streams that hold a turn's state (Thinker, Talker, Code2Wav, hooks) run
again there, their inputs replayed (`ReplicaSet.stream`, services/serving/resume.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request

import numpy as np
import pytest

from services.client import OmniClient
from services.events import AudioChunk, TextDelta, TurnSummary
from services.serving import serve_cmd
from tests.cluster import deployed
from tests.test_serving import CONFIGS

TEXT = "Tell me a long story about the sea."
# Long enough that the Thinker is still writing when the first text arrives, and the Talker and Code2Wav are still
# at work when the first audio does.
TURN = dict(max_new_tokens=200, max_audio_frames=60)
TWO_REPLICAS = ("mtp", "thinker", "hooks", "talker", "code2wav")


@pytest.fixture(scope="module")
def cluster(tiny_ckpt):
    """deploy/local.yaml with two replicas of every stage that a turn streams through."""
    config = serve_cmd.load_config(CONFIGS[0], model=tiny_ckpt)
    for app in config.applications:
        if app.name in TWO_REPLICAS:
            app.deployments[0].num_replicas = 2
    with deployed(config) as running:
        yield running


@pytest.fixture(scope="module")
def undisturbed(tiny_ckpt):
    """The same turn in this process: (codes, samples)."""
    from services.conductor import Conductor, TurnRequest
    from services.engines.bundle import Engines
    from services.engines.sampling import SamplingParams
    from services.stages import Stages
    from services.turn_parts import text_part

    async def run():
        conductor = Conductor(Stages.local(Engines.load(tiny_ckpt)))
        pcm, summary = bytearray(), None
        async for event in conductor.run(TurnRequest(parts=[text_part(TEXT)],
                                                     thinker_sampling=SamplingParams(greedy=True), **TURN)):
            if isinstance(event, AudioChunk):
                pcm += event.pcm16
            elif isinstance(event, TurnSummary):
                summary = event
        return summary, np.frombuffer(bytes(pcm), "<i2").astype(np.float32) / 32767.0

    return asyncio.run(run())


def _replica_pids(app: str) -> list[int]:
    """The PIDs of an application's replicas: Ray titles each replica's process `ray::ServeReplica:<app>:...`."""
    pids = []
    for proc in os.listdir("/proc"):
        try:
            with open(f"/proc/{proc}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError):
            continue
        if title.startswith(f"ray::ServeReplica:{app}:"):
            pids.append(int(proc))
    return sorted(pids)


def _failovers(metrics_port: int, app: str) -> float:
    return _counter(metrics_port, "ray_omni_stage_failovers_total", f'app="{app}"')


def _counter(metrics_port: int, name: str, *labels: str) -> float:
    """A counter's sum over every replica on Ray's metrics endpoint, for the series with all of `labels`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        lines = [line for line in response.read().decode().splitlines()
                 if line.startswith(name) and all(label in line for label in labels)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def test_a_sessions_turns_go_to_the_thinker_replica_that_keeps_its_kv(cluster, tiny_ckpt):
    """Two Thinker replicas: a session's turns go to one (rendezvous hashing on its key), which reuses the KV it kept
    for it. Without that, sequential turns alternate between the replicas and the second would prefill in full."""
    from services.conductor import Conductor, TurnRequest
    from services.engines.bundle import Engines
    from services.engines.sampling import SamplingParams
    from services.stages import Stages
    from services.turn_parts import text_part

    short = dict(max_new_tokens=8, max_audio_frames=20)
    reused = []

    async def reused_now(at_least: float) -> float:
        deadline, seen = time.monotonic() + 30, 0.0
        while time.monotonic() < deadline:  # Ray exports the replicas' metrics every second
            seen = await asyncio.to_thread(_counter, cluster.metrics_port, "ray_omni_stage_prompt_tokens_total",
                                           'stage="thinker"', 'kind="reused"')
            if seen >= at_least:
                break
            await asyncio.sleep(1)
        return seen

    async with OmniClient(cluster.address) as client:
        first, _ = await client.collect(text=TEXT, greedy=True, session_id="affine", **short)
        reused.append(await reused_now(0))
        second, _ = await client.collect(text="And then?", greedy=True, session_id="affine", **short)
    history = [{"role": "user", "content": [text_part(TEXT)]}, {"role": "assistant", "content": first.text}]
    async for event in Conductor(Stages.local(Engines.load(tiny_ckpt))).run(TurnRequest(
            parts=[text_part("And then?")], history=history, thinker_sampling=SamplingParams(greedy=True), **short)):
        expected = event
    assert second.thinker_token_ids == expected.thinker_token_ids and second.codes == expected.codes
    assert await reused_now(reused[0] + 10) >= reused[0] + 10  # turn 1's prompt at least (tens of tokens)


async def test_a_killed_mtp_replica_costs_the_turn_nothing(cluster, undisturbed):
    pids = _replica_pids("mtp")
    assert len(pids) == 2
    chunks, summary, killed = [], None, False
    async with OmniClient(cluster.address) as client:
        async for event in client.converse(text=TEXT, greedy=True, **TURN):
            if isinstance(event, AudioChunk):
                chunks.append(event)
                if not killed:  # the Talker is mid-answer, sending frames to both replicas
                    os.kill(pids[0], signal.SIGKILL)
                    killed = True
            elif isinstance(event, TurnSummary):
                summary = event
    assert killed
    _assert_undisturbed(chunks, summary, undisturbed)
    await _assert_failed_over(cluster, "mtp", 1)  # counted by the Talker replica that asked the frames again


def _assert_undisturbed(chunks: list[AudioChunk], summary: TurnSummary, undisturbed) -> None:
    expected, samples = undisturbed
    assert summary.finish_reason == expected.finish_reason
    assert summary.thinker_token_ids == expected.thinker_token_ids and summary.text == expected.text
    assert [c.seq for c in chunks] == list(range(len(chunks)))  # nothing repeated, nothing missing
    assert summary.codes == expected.codes
    got = np.concatenate([c.samples for c in chunks])
    assert got.shape == samples.shape and np.abs(got - samples).max() <= 1e-4


async def _assert_failed_over(cluster, app: str, at_least: float) -> None:
    deadline, seen = time.monotonic() + 30, 0.0
    while seen < at_least and time.monotonic() < deadline:  # Ray exports the gateway's metrics every second
        await asyncio.sleep(1)
        seen = await asyncio.to_thread(_failovers, cluster.metrics_port, app)
    assert seen >= at_least


async def _two_turns_killing(cluster, app: str, when) -> list[list]:
    """Two identical turns at once (the gateway gives each its own replica of `app`: the least busy), and one of the
    two replicas killed once `when(events)` holds for both turns' events so far: one turn loses its replica."""
    pids = _replica_pids(app)
    assert len(pids) == 2, f"{app}: {pids}"
    events: list[list] = [[], []]
    killed = asyncio.Event()

    async def turn(i: int, client: OmniClient) -> None:
        async for event in client.converse(text=TEXT, greedy=True, **TURN):
            events[i].append(event)
            if not killed.is_set() and all(when(e) for e in events):
                os.kill(pids[0], signal.SIGKILL)
                killed.set()

    async with OmniClient(cluster.address) as client:
        await asyncio.gather(turn(0, client), turn(1, client))
    assert killed.is_set()
    return events


def _writing(events: list) -> bool:
    return any(isinstance(e, TextDelta) for e in events)


def _speaking(events: list) -> bool:
    return any(isinstance(e, AudioChunk) for e in events)


@pytest.mark.parametrize("app, when", [("thinker", _writing), ("hooks", _writing), ("talker", _speaking),
                                       ("code2wav", _speaking)])
async def test_a_killed_stream_replica_costs_the_turn_nothing(cluster, undisturbed, app, when):
    before = await asyncio.to_thread(_failovers, cluster.metrics_port, app)
    for events in await _two_turns_killing(cluster, app, when):
        _assert_undisturbed([e for e in events if isinstance(e, AudioChunk)], events[-1], undisturbed)
    await _assert_failed_over(cluster, app, before + 1)
