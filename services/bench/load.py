"""`omni bench load`: N conversations at once, for several N, side by side in one run (issue 8).

    omni bench load                                   # in process: the tiny checkpoint, then the wide one
    omni bench load --address 127.0.0.1:9000 --metrics-port 8080   # a deployment (omni serve), at the client

For each concurrency N, N clients each run `--turns` greedy turns back to back (the same text, `--tokens` Thinker
tokens, at most `--frames` frames). Per stream: time to the first audio packet (p50/p95) and RTF (turn time / audio
seconds, p50); for the whole round: audio seconds produced per wall second, and the mean batch per engine step of
every stage ("b." columns: `omni_stage_batch_rows_total` over steps; in process from this process's registry, for a
deployment from Ray's Prometheus endpoint). The ratio columns set each N against N = 1; the goals on a 2-core machine (issue 8): RTF at 6
within 1.5x of RTF at 1, audio per second at 6 at least 3.5x that at 1, first audio at 6 within 2x of 1. The last
column says where the gateway's first audio went (p50 of each part over the turns, from the turns' summaries):
preprocessing, the Thinker's first token from its start, the Talker's first frame from that, and the rest (Code2Wav's
first packet, hops and waits).

The wide checkpoint has the real Talker, MTP and Code2Wav widths and a narrow Thinker (`omni bench latency`'s), with
random weights. MTP alone at batch 1, 8 and 32: `omni bench mtp`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.bench.latency import DEFAULT_REAL_CONFIG, wide_config

STAGES = ("thinker", "talker", "mtp", "code2wav")
TEXT = "Tell me a story about a lighthouse keeper."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="omni bench load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,6,16", help="comma-separated numbers of conversations at once")
    p.add_argument("--turns", type=int, default=2, help="turns each client runs back to back per concurrency")
    p.add_argument("--tokens", type=int, default=40, help="Thinker tokens per turn (greedy)")
    p.add_argument("--frames", type=int, default=120, help="frame cap per turn (80 ms each)")
    p.add_argument("--address", help="a deployment's gRPC address (omni serve); default: in process")
    p.add_argument("--metrics-port", type=int, help="with --address: Ray's Prometheus port (omni serve "
                                                    "--metrics-port), for the batch sizes")
    p.add_argument("--real-config", type=Path, default=DEFAULT_REAL_CONFIG,
                   help="the real model's config.json, for the wide checkpoint's widths")
    p.add_argument("--skip-wide", action="store_true", help="in process: only the tiny checkpoint")
    args = p.parse_args(argv)
    try:
        args.concurrency = [int(n) for n in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency takes numbers like 1,4,6,16, got {args.concurrency!r}")
    if min(args.concurrency) < 1 or args.turns < 1 or args.tokens < 1 or args.frames < 2:
        p.error("--concurrency, --turns and --tokens must be >= 1, --frames >= 2")
    return args


class Turns:
    """Where a client's turns go: in process (a Conductor) or to a deployment (an OmniClient)."""

    def __init__(self, run_turn: Callable, batch_sizes: Callable[[], dict[str, tuple[float, float]]]):
        self.run_turn, self.batch_sizes = run_turn, batch_sizes


def in_process(model_dir: Path) -> Turns:
    from prometheus_client import REGISTRY

    from services.conductor import Conductor, TurnRequest
    from services.engines.bundle import Engines
    from services.engines.sampling import SamplingParams
    from services.events import AudioChunk, TurnSummary
    from services.stages import Stages
    from services.turn_parts import text_part

    engines = Engines.load(model_dir)
    engines.warm()  # as replicas do at startup: the first turns that run together wait for no trace
    conductor = Conductor(Stages.local(engines))

    async def run_turn(args) -> tuple[float | None, float, float]:
        req = TurnRequest(parts=[text_part(TEXT)], max_new_tokens=args.tokens, max_audio_frames=args.frames,
                          thinker_sampling=SamplingParams(greedy=True))
        return await _timed((e async for e in conductor.run(req)), AudioChunk, TurnSummary)

    def batch_sizes():
        return {s: tuple(REGISTRY.get_sample_value(name, {"stage": s}) or 0.0 for name in _ROWS_STEPS)
                for s in STAGES}

    return Turns(run_turn, batch_sizes)


def deployed(address: str, metrics_port: int | None) -> Turns:
    from services.client import OmniClient
    from services.events import AudioChunk, TurnSummary

    async def run_turn(args) -> tuple[float | None, float, float]:
        async with OmniClient(address) as client:
            return await _timed(client.converse(text=TEXT, greedy=True, max_new_tokens=args.tokens,
                                                max_audio_frames=args.frames), AudioChunk, TurnSummary)

    def batch_sizes():
        if metrics_port is None:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            return batch_counts(response.read().decode())

    return Turns(run_turn, batch_sizes)


# (items, steps) of a batching stage; their ratio is the exact mean batch (Ray's histogram _sum is approximate).
_ROWS_STEPS = ("omni_stage_batch_rows_total", "omni_stage_step_seconds_count")


def batch_counts(prometheus_text: str) -> dict[str, tuple[float, float]]:
    """stage -> (items, steps) from Ray's Prometheus endpoint, summed over the stage's replicas."""
    return {stage: tuple(ray_sum(prometheus_text, name, {"stage": stage}) for name in _ROWS_STEPS) for stage in STAGES}


def ray_sum(prometheus_text: str, name: str, labels: dict[str, str]) -> float:
    """A metric of ours as Ray exports it (`ray_<name>`), summed over the series with `labels` (every replica's)."""
    want = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in prometheus_text.splitlines()
               if line.startswith(f"ray_{name}{{") and all(w in line for w in want))


async def _timed(events, audio_type, summary_type) -> tuple[float | None, float, float, dict]:
    """(first audio s, turn s, audio s, where its first audio went) of one turn's events."""
    t0, first, audio_s, split = time.perf_counter(), None, 0.0, {}
    async for event in events:
        if isinstance(event, audio_type) and first is None:
            first = time.perf_counter() - t0
        elif isinstance(event, summary_type):
            audio_s = event.num_samples / event.sample_rate
            split = first_audio_split(event.timings)
    return first, time.perf_counter() - t0, audio_s, split


def first_audio_split(timings: dict) -> dict:
    """The gateway's first audio (s) in its stages' parts: preprocessing, the Thinker's first token from its start,
    the Talker's first frame from that, and the rest (Code2Wav's first packet, hops, waits)."""
    need = ("preprocess_s", "thinker_ttft_s", "talker_ttft_s", "time_to_first_audio_s")
    if not all(k in timings for k in need):
        return {}
    prep, think, talk, total = (timings[k] for k in need)
    return dict(prep=prep, thinker=think, talker=talk, rest=total - prep - think - talk)


async def _round(turns: Turns, args, n: int) -> dict:
    before = turns.batch_sizes()
    t0 = time.perf_counter()

    async def client():
        return [await turns.run_turn(args) for _ in range(args.turns)]

    results = [r for rs in await asyncio.gather(*(client() for _ in range(n))) for r in rs]
    wall = time.perf_counter() - t0
    if args.address:
        await asyncio.sleep(6)  # Ray exports metrics every few seconds
    after = turns.batch_sizes()
    firsts = [f for f, _, _, _ in results if f is not None]
    rtfs = [t / a for _, t, a, _ in results if a > 0]
    splits = [s for _, _, _, s in results if s]
    batch = {s: (after[s][0] - before[s][0]) / (after[s][1] - before[s][1])
             for s in after if after[s][1] > before[s][1]}
    return dict(n=n, turns=len(results), first_p50=np.percentile(firsts, 50) if firsts else float("nan"),
                first_p95=np.percentile(firsts, 95) if firsts else float("nan"),
                rtf=float(np.median(rtfs)) if rtfs else float("nan"),
                throughput=sum(a for _, _, a, _ in results) / wall, batch=batch,
                split={k: float(np.median([s[k] for s in splits])) for k in splits[0]} if splits else {})


HEADER = (f"{'where':<8} {'N':>3} {'turns':>5} {'1st audio p50/p95':>18} {'RTF':>6} {'audio s/s':>9} "
          + " ".join(f"{'b.' + s:>10}" for s in STAGES) + f" {'RTF/1':>6} {'thru/1':>6} {'1st/1':>6}"
          + f"  {'prep/thinker/talker/rest p50':>28}")


def print_row(where: str, row: dict, base: dict) -> None:
    batch = " ".join(f"{row['batch'][s]:>10.2f}" if s in row["batch"] else f"{'-':>10}" for s in STAGES)
    first = f"{row['first_p50'] * 1e3:.0f}/{row['first_p95'] * 1e3:.0f} ms"
    split = "/".join(f"{v * 1e3:.0f}" for v in row["split"].values()) + " ms" if row["split"] else "-"
    print(f"{where:<8} {row['n']:>3} {row['turns']:>5} {first:>18} {row['rtf']:>6.2f} {row['throughput']:>9.2f} "
          f"{batch} {row['rtf'] / base['rtf']:>6.2f} {row['throughput'] / base['throughput']:>6.2f} "
          f"{row['first_p50'] / base['first_p50']:>6.2f}  {split:>28}", flush=True)


async def bench(where: str, turns: Turns, args) -> list[dict]:
    await turns.run_turn(argparse.Namespace(**{**vars(args), "tokens": 3, "frames": 3}))  # warm-up
    rows: list[dict] = []
    for n in args.concurrency:
        rows.append(await _round(turns, args, n))
        print_row(where, rows[-1], rows[0])
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import transformers

    from services.workers import threads_summary

    transformers.logging.set_verbosity_error()
    print(f"omni bench load: {args.turns} turns per client, {args.tokens} tokens / <= {args.frames} frames each, "
          f"greedy; concurrency {args.concurrency}; {threads_summary()}")
    print(HEADER)
    if args.address:
        asyncio.run(bench("served", deployed(args.address, args.metrics_port), args))
        return
    from services.checkpoint.tiny import tiny_config, write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        asyncio.run(bench("tiny", in_process(write_random_checkpoint(tmp / "tiny", tiny_config())), args))
        if args.skip_wide:
            return
        if not args.real_config.is_file():
            print(f"wide: skipped, {args.real_config} not found (pass --real-config)")
            return
        cfg = wide_config(args.real_config, talker_layers=4, talker_experts=16)
        asyncio.run(bench("wide", in_process(write_random_checkpoint(tmp / "wide", cfg)), args))


if __name__ == "__main__":
    main()
