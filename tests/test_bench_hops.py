"""`omni bench hops` runs end to end with tiny counts and prints a row per route and size (no timing assertions)."""

from __future__ import annotations

import os

import pytest

from services.bench import hops
from services.wire import cluster_tls

ROUTES = ["grpc.aio bytes echo (baseline)", "MTP.Predict stub, to/from_proto", "Talker->MTP: RemoteMTP",
          "->Code2Wav: RemoteCode2Wav", "->AudioEncoder: call per tensor"]
HOOKS = "gateway->Hooks: one token"  # its messages are one token: "token" for a size, "-" for MB/s
SIZES = ["64 B", "4 KiB", "1 MiB"]


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_bench_prints_every_route_at_every_size(capsys, monkeypatch, tls):
    monkeypatch.delenv(cluster_tls.TLS_DIR_ENV, raising=False)
    monkeypatch.delenv(cluster_tls.TLS_SWITCH_ENV, raising=False)
    hops.main(["--messages", "6", "--window", "4", *(["--tls"] if tls else [])])
    # The bench's stage-TLS environment is its own: a test (or cluster) after it sees what was there before.
    assert cluster_tls.TLS_DIR_ENV not in os.environ and cluster_tls.TLS_SWITCH_ENV not in os.environ
    out = capsys.readouterr().out
    assert ("stage routes (baseline included) mutual TLS" if tls else "(baseline included) plaintext") in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("route"))
    rows, section = {}, 0
    for line in lines[header + 1:]:
        if line.startswith("per-frame routes within 3x"):
            verdict = line
            break
        if not line:
            section += 1
            continue
        words = line.split()
        if words[-7] == "token":  # route (words), "token", then 6 values
            route, size, values = " ".join(words[:-7]), f"token@{SIZES[section]}", words[-6:]
        else:  # route (words), size (number and unit), then 6 numbers
            route, size, values = " ".join(words[:-8]), " ".join(words[-8:-6]), words[-6:]
        rows[route, size] = [float(v) if v != "-" else None for v in values]
    assert list(rows) == [(route, size) for size in SIZES for route, size in
                          [*((r, size) for r in ROUTES), (HOOKS, f"token@{size}")]]
    # p50, p90, p50 ratio, msg/s, MB/s, throughput ratio; MB/s of 64 B messages prints as 0.0 on a slow machine
    assert all(v > 0 for values in rows.values() for i, v in enumerate(values) if i != 4)
    assert all(values[4] >= 0 for (route, _), values in rows.items() if route != HOOKS)
    assert all(values[4] is None for (route, _), values in rows.items() if route == HOOKS)
    for size in SIZES:
        p50_ratio, throughput_ratio = rows[ROUTES[0], size][2], rows[ROUTES[0], size][5]
        assert p50_ratio == throughput_ratio == 1.0  # the baseline against itself
    assert verdict.endswith(": yes") or ": no: " in verdict


def test_sizes_parse_and_refuse_what_no_float32_tensor_message_holds():
    assert [hops.parse_size(s) for s in ("64", "64B", "4KiB", " 1MiB")] == [64, 64, 4096, 1 << 20]
    for bad in ("0", "6", "1.5KiB", "8MiB", "big"):
        with pytest.raises(ValueError):
            hops.parse_size(bad)
