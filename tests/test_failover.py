"""A stage replica killed mid-turn (SIGKILL, on a real local Ray cluster) while a second replica runs: calls that
hold no state on a replica (MTP frames, encoder calls) go to the survivor, and the turn completes with the codes
and samples of an undisturbed run (services/serving/routes.py, `ReplicaSet.call`)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request

import numpy as np
import pytest

from services.client import OmniClient
from services.events import AudioChunk, TurnSummary
from services.serving import serve_cmd
from tests.cluster import deployed
from tests.test_serving import CONFIGS

TEXT = "Tell me a long story about the sea."
TURN = dict(max_new_tokens=24, max_audio_frames=60)


@pytest.fixture(scope="module")
def cluster(tiny_ckpt):
    """deploy/local.yaml with two MTP replicas."""
    config = serve_cmd.load_config(CONFIGS[0], model=tiny_ckpt)
    mtp = next(app for app in config.applications if app.name == "mtp")
    mtp.deployments[0].num_replicas = 2
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
        return summary.codes, np.frombuffer(bytes(pcm), "<i2").astype(np.float32) / 32767.0

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
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        lines = [line for line in response.read().decode().splitlines()
                 if line.startswith("ray_omni_stage_failovers_total") and f'app="{app}"' in line]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


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
    codes, samples = undisturbed
    assert killed and summary.finish_reason in ("stop", "length")
    assert [c.seq for c in chunks] == list(range(len(chunks)))  # nothing repeated, nothing missing
    assert summary.codes == codes
    got = np.concatenate([c.samples for c in chunks])
    assert got.shape == samples.shape and np.abs(got - samples).max() <= 1e-4
    deadline, seen = time.monotonic() + 30, 0.0
    while seen < 1 and time.monotonic() < deadline:  # the Talker replica counted the frames it asked again
        await asyncio.sleep(1)
        seen = await asyncio.to_thread(_failovers, cluster.metrics_port, "mtp")
    assert seen >= 1
