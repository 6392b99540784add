"""`omni bench soak` against an in-process gateway over real gRPC: it runs turns from every client loop, prints a
row per interval with the latency percentiles, and finds omni-serve processes by their Ray names."""

from __future__ import annotations

import re
import subprocess

import pytest

from services.bench import soak
from services.engines.bundle import Engines
from services.gateway import OmniServicer, start_gateway
from services.sessions import InProcessSessions
from services.stages import Stages
from tests.helpers import LoopThread


@pytest.fixture(scope="module")
def gateway(tiny_ckpt):
    loop = LoopThread()
    servicer = OmniServicer(Stages.local(Engines.load(tiny_ckpt)), InProcessSessions(), default_deadline_s=60)
    server, port = loop.run(start_gateway(servicer))
    yield f"127.0.0.1:{port}"
    loop.run(server.stop(None))
    loop.stop()


def test_soak_prints_a_row_per_interval_with_turns_from_every_client(gateway, capsys):
    soak.main(["--address", gateway, "--minutes", str(4 / 60), "--interval-s", "2", "--concurrency", "2",
               "--max-new-tokens", "4", "--max-audio-frames", "8"])
    out = capsys.readouterr().out
    rows = re.findall(r"^ +(\d+) +(\d+) +(\S+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", out, re.M)
    assert len(rows) >= 2, out
    assert sum(int(r[1]) for r in rows) >= 4 and all(r[2] == "0" for r in rows), out  # turns, no errors
    assert all(float(r[3]) <= float(r[4]) and float(r[5]) <= float(r[6]) for r in rows), out  # p50 <= p95
    assert "first vs last interval: total p95" in out and "RSS MB:" in out


def test_soak_counts_failed_turns_by_status(capsys):
    soak.main(["--address", "127.0.0.1:1", "--minutes", str(1.5 / 60), "--interval-s", "1", "--concurrency", "1",
               "--deadline-s", "0.5"])
    out = capsys.readouterr().out
    assert re.search(r"^ +1 +0 +UNAVAILABLE \d+", out, re.M), out


def test_serve_processes_are_found_by_their_ray_names():
    """A process titled as Ray titles a Serve replica is found, with its resident memory."""
    # As Ray titles a replica busy in a method: the name leaves the method out.
    child = subprocess.Popen(["bash", "-c", "exec -a ray::ServeReplica:omni:Gateway.handle_request sleep 30"])
    try:
        for _ in range(100):
            if child.pid in soak.serve_processes():
                break
            subprocess.run(["sleep", "0.05"])
        assert soak.serve_processes()[child.pid] == "omni:Gateway"
        assert soak.rss_mb({child.pid: "omni:Gateway"})["omni:Gateway"] > 1
    finally:
        child.kill()
        child.wait()
