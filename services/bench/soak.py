"""`omni bench soak`: C client loops running turns against a deployment for M minutes.

    omni bench soak --address 127.0.0.1:9000 --minutes 30 --concurrency 4

Every interval (a minute by default) it prints one row for the turns that ended in it: how many, how many failed
(by status), and the p50/p95 of time to first audio packet and of total time, measured at the client; then the
resident memory of every omni-serve process on this machine (each Serve replica, Serve's proxy and controller, the
`omni serve` process), so a leak shows as a column that keeps growing. The last lines compare the first and the last
interval. What "flat" means is the reader's call; the goal in issue 11 is 30 minutes at 4 concurrent with flat p95
and memory.

Memory is read with psutil from this machine's process table (Ray names its workers `ray::ServeReplica:<app>:
<deployment>`): run the soak on the node that runs the deployment, as `omni serve` does.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import time
from dataclasses import dataclass, field

import numpy as np
import psutil

from services.client import ConverseError, OmniClient
from services.events import AudioChunk, TurnSummary

PROCESS_PREFIXES = ("ray::ServeReplica:", "ray::ProxyActor", "ray::ServeController")


@dataclass
class Window:
    """The turns that ended in one interval."""

    first_audio_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="omni bench soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--address", default="127.0.0.1:9000", help="the deployment's gRPC address (omni serve's)")
    p.add_argument("--minutes", type=float, default=30.0, help="how long to run")
    p.add_argument("--concurrency", type=int, default=4, help="client loops, each one turn at a time")
    p.add_argument("--interval-s", type=float, default=60.0, help="seconds per printed row")
    p.add_argument("--text", default="Tell me about the sea.", help="each turn's text")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--max-audio-frames", type=int, default=48)
    p.add_argument("--deadline-s", type=float, default=120.0, help="each turn's deadline")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1 or args.interval_s <= 0:
        p.error("--minutes and --interval-s must be > 0, --concurrency >= 1")
    return args


async def client_loop(args: argparse.Namespace, end: float, window: list[Window]) -> None:
    """Turns back to back until `end`; each result lands in the window current when the turn ends."""
    async with OmniClient(args.address) as client:
        while time.monotonic() < end:
            t0, first = time.perf_counter(), None
            try:
                turn = client.converse(text=args.text, greedy=True, max_new_tokens=args.max_new_tokens,
                                       max_audio_frames=args.max_audio_frames, deadline_s=args.deadline_s)
                async for event in turn:
                    if first is None and isinstance(event, AudioChunk):
                        first = time.perf_counter() - t0
                    if isinstance(event, TurnSummary):
                        window[0].total_s.append(time.perf_counter() - t0)
                        if first is not None:
                            window[0].first_audio_s.append(first)
            except ConverseError as e:
                window[0].errors[e.code.name] += 1
                await asyncio.sleep(0.5)  # a down deployment is not hammered


def serve_processes() -> dict[int, str]:
    """pid -> name of every omni-serve process here: Serve's replicas, proxy and controller, `omni serve`."""
    found = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        head = cmdline[0].split()[0] if cmdline and cmdline[0].strip() else ""  # Ray's title may hold spaces
        if head.startswith(PROCESS_PREFIXES):
            # A busy actor's title names its method too ("ray::ServeReplica:omni:Gateway.handle_request"): drop it.
            found[proc.info["pid"]] = head.removeprefix("ray::").removeprefix("ServeReplica:").split(".")[0]
        elif "serve" in cmdline and any(a.endswith("omni") for a in cmdline[:2]):
            found[proc.info["pid"]] = "omni serve"
    return found


def rss_mb(processes: dict[int, str]) -> dict[str, float]:
    """name -> resident MB (processes of one name, e.g. two replicas, numbered in pid order)."""
    out, seen = {}, collections.Counter()
    for pid, name in sorted(processes.items()):
        try:
            rss = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
        seen[name] += 1
        out[name if seen[name] == 1 else f"{name}#{seen[name]}"] = rss
    return out


def _pcts(values: list[float]) -> str:
    if not values:
        return "      -       -"
    p50, p95 = np.percentile(values, [50, 95])
    return f"{p50:7.3f} {p95:7.3f}"


def report_row(i: int, w: Window, memory: dict[str, float]) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in sorted(w.errors.items())) or "0"
    row = (f"{i:4d} {len(w.total_s):6d}  {errors:>8}  {_pcts(w.first_audio_s)}  {_pcts(w.total_s)}\n"
           "     RSS MB: " + "  ".join(f"{name} {mb:.0f}" for name, mb in memory.items()))
    return row


async def soak(args: argparse.Namespace) -> list[tuple[Window, dict[str, float]]]:
    processes = serve_processes()
    print(f"omni bench soak: {args.concurrency} clients against {args.address} for {args.minutes:g} min; "
          f"{len(processes)} omni-serve processes here")
    print(f"{'min' if args.interval_s == 60 else 'win':>4} {'turns':>6}  {'errors':>8}  "
          f"{'first audio p50/p95 s':>15}  {'total p50/p95 s':>15}")
    end = time.monotonic() + args.minutes * 60
    window = [Window()]
    rows = []
    started = time.monotonic()
    loops = [asyncio.create_task(client_loop(args, end, window)) for _ in range(args.concurrency)]
    try:
        i = 0
        while not all(t.done() for t in loops):
            await asyncio.wait(loops, timeout=args.interval_s)
            i += 1
            done, window[0] = window[0], Window()
            memory = rss_mb(processes | serve_processes())  # replicas Serve restarted are new pids
            now = time.monotonic()
            if now - started >= 0.9 * args.interval_s:  # the tail after the last full interval is printed only
                rows.append((done, memory))
            started = now
            print(report_row(i, done, memory), flush=True)
        for t in loops:
            t.result()
    finally:
        for t in loops:
            t.cancel()
    return rows


def summarize(rows: list[tuple[Window, dict[str, float]]]) -> str:
    full = [r for r in rows if r[0].total_s] or rows
    (first, mem0), (last, mem1) = full[0], full[-1]
    lines = [f"first vs last interval: total p95 {_pcts(first.total_s).split()[-1]} -> "
             f"{_pcts(last.total_s).split()[-1]} s; first audio p95 {_pcts(first.first_audio_s).split()[-1]} -> "
             f"{_pcts(last.first_audio_s).split()[-1]} s",
             "memory growth MB: " + "  ".join(f"{name} {mem1[name] - mb:+.0f}" for name, mb in mem0.items()
                                               if name in mem1)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = asyncio.run(soak(args))
    if rows:
        print(summarize(rows))
