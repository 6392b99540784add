"""`omni bench code2wav`: streaming Code2Wav against the full forward and against re-decoding left context.

Two models with random weights: the tiny checkpoint's Code2Wav config and the real one's (216 M parameters, from
`--real-config`; skipped if that file is absent). For each:
- one 1-frame push early in a stream (median over frames 6-14, 3 fresh streams) and late (median over the 27
  frames around `--frames`); goal late / early <= 1.2: the stream's state is bounded, so a frame costs the same
  anywhere;
- the total of 1-frame pushes over N frames against one full forward over the same N frames (goal <= 1.3), and
  the same with 4-frame pushes;
- the baseline other servers use, the reference's `chunked_decode` with 25-frame chunks and 25 frames of left
  context re-decoded before each: its cost, and the samples it loses at chunk boundaries.
N is `--frames` for the tiny model and `--real-frames` for the real one; late frames are reached by pushing 50
frames at a time. The defaults take about 5 minutes on 2 busy CPU cores, nearly all of it the real model.

    python -m services.bench.code2wav [--frames 1000] [--real-frames 150] [--device cpu] [--dtype float32]
                                      [--threads 1] [--real-config PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from services.config import EngineConfig
from services.engines.code2wav import Code2WavEngine, Code2WavStream

DEFAULT_REAL_CONFIG = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / \
    "qwen3-omni-30b-a3b-instruct.config.json"
CONTEXT = 25  # the re-decode baseline: frames per chunk, and frames of left context re-decoded before each
FAST_FORWARD = 50  # frames per push while skipping to the late frames (not timed)
WINDOW = 9  # 1-frame pushes around frame x, 3 rounds of them: their median is "the time at frame x"
ROUNDS = 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omni bench code2wav", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1000,
                        help="late frame index for the per-frame timing; frames decoded for the tiny model's totals")
    parser.add_argument("--real-frames", type=int, default=150,
                        help="frames decoded for the real model's totals (~0.6 s of CPU per frame for all three)")
    parser.add_argument("--real-config", type=Path, default=DEFAULT_REAL_CONFIG,
                        help="Qwen3-Omni config.json whose code2wav_config gives the real dimensions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 keeps timings stable on a small shared machine, where two OpenMP "
                             "threads per process make small ops 10x slower whenever other processes are busy")
    args = parser.parse_args(argv)
    if args.frames < 20 or args.real_frames < 20:
        parser.error("--frames and --real-frames must be at least 20")
    torch.set_num_threads(args.threads)
    config = EngineConfig(device=args.device, dtype=args.dtype)

    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    from services.checkpoint.tiny import tiny_config

    models = [("tiny config", tiny_config().code2wav_config, args.frames)]
    if args.real_config.is_file():
        real = json.loads(args.real_config.read_text())["code2wav_config"]
        models.append(("real config", Qwen3OmniMoeCode2WavConfig(**real), args.real_frames))
    else:
        print(f"skipping the real-dimension model: {args.real_config} not found (--real-config PATH)")

    columns = []
    for name, c2w_config, frames in models:
        torch.manual_seed(0)
        engine = Code2WavEngine(Qwen3OmniMoeCode2Wav(c2w_config), config)
        print(f"running {name}: {frames} frames ...", flush=True)
        columns.append((name, measure(engine, frames, args.frames)))

    threads = torch.get_num_threads() if config.device == "cpu" else "-"
    print(f"\nCode2Wav, random weights, {config.device} {config.dtype}, torch threads {threads}")
    print_table(columns)


def measure(engine: Code2WavEngine, frames: int, late_frame: int) -> dict[str, str]:
    codes = torch.randint(0, engine.codebook_size, (max(frames, late_frame + WINDOW * ROUNDS), engine.num_quantizers))
    _warm_up(engine, codes)

    stream = engine.stream()
    push_s, wavs = _pushes(engine, stream, codes[:frames])
    streamed = torch.cat(wavs + [stream.finish()])
    stream4_s = sum(_pushes(engine, engine.stream(), codes[:frames], step=4)[0])
    full, full_s = _timed(engine, engine.decode, codes[:frames])
    redecoded, redecode_s = _timed(engine, _redecode, engine, codes[:frames])

    # Early and late 1-frame pushes, interleaved so that load from other processes hits both alike. A late stream
    # is reached by pushing 50 frames at a time (the state is the same whatever the chunking).
    late_start = late_frame - WINDOW * ROUNDS // 2
    late_stream = engine.stream()
    for i in range(0, late_start, FAST_FORWARD):
        late_stream.push(codes[i : min(i + FAST_FORWARD, late_start)])
    early_s, late_s = [], []
    for r in range(ROUNDS):
        stream = engine.stream()
        stream.push(codes[: 10 - WINDOW // 2])
        early_s += _pushes(engine, stream, codes[10 - WINDOW // 2 : 10 + WINDOW // 2 + 1])[0]
        late_s += _pushes(engine, late_stream, codes[late_start + r * WINDOW : late_start + (r + 1) * WINDOW])[0]
    early, late = statistics.median(early_s), statistics.median(late_s)

    stream_s = sum(push_s)
    audio_s = frames * engine.samples_per_frame / engine.sample_rate
    return {
        "parameters (M)": f"{sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}",
        "frames N": f"{frames}",
        "1-frame push @ frame 10 (ms)": f"{early * 1e3:.2f}",
        f"1-frame push @ frame {late_frame} (ms)": f"{late * 1e3:.2f}",
        "  late / early (goal <= 1.2)": f"{late / early:.2f}",
        "stream, 1-frame pushes, total (s)": f"{stream_s:.2f}",
        "full forward (s)": f"{full_s:.2f}",
        "  stream / full (goal <= 1.3)": f"{stream_s / full_s:.2f}",
        "  stream, 4-frame pushes / full": f"{stream4_s / full_s:.2f}",
        f"re-decode {CONTEXT}+{CONTEXT} baseline (s)": f"{redecode_s:.2f}",
        "  re-decode / full": f"{redecode_s / full_s:.2f}",
        "real-time factor, 1-frame stream": f"{stream_s / audio_s:.3f}",
        "max |stream - full|": f"{(streamed - full).abs().max().item():.1e}",
        "samples: full / stream": f"{full.numel()} / {streamed.numel()}",
        "samples lost by re-decode": f"{full.numel() - redecoded.numel()}",
    }


def _pushes(
    engine: Code2WavEngine, stream: Code2WavStream, codes: torch.Tensor, step: int = 1
) -> tuple[list[float], list[torch.Tensor]]:
    """Push `codes` `step` frames at a time: the seconds each push took, and what each returned."""
    times, wavs = [], []
    for i in range(0, codes.shape[0], step):
        wav, seconds = _timed(engine, stream.push, codes[i : i + step])
        times.append(seconds)
        wavs.append(wav)
    return times, wavs


def _redecode(engine: Code2WavEngine, codes: torch.Tensor) -> torch.Tensor:
    """What other servers do: decode each 25-frame chunk with the 25 frames before it, keep the new part."""
    with torch.inference_mode():
        return engine.model.chunked_decode(codes.T[None].to(engine.config.device), CONTEXT, CONTEXT)[0, 0]


def _timed(engine: Code2WavEngine, fn, *args):
    _sync(engine)
    start = time.perf_counter()
    result = fn(*args)
    _sync(engine)
    return result, time.perf_counter() - start


def _sync(engine: Code2WavEngine) -> None:
    if engine.config.device.startswith("cuda"):
        torch.cuda.synchronize()


def _warm_up(engine: Code2WavEngine, codes: torch.Tensor) -> None:
    """One-time costs (allocator, kernel selection) out of the timings."""
    engine.decode(codes[:CONTEXT])
    stream = engine.stream()
    for i in range(3):
        stream.push(codes[i : i + 1])
    stream.push(codes[3:CONTEXT])


def print_table(columns: list[tuple[str, dict[str, str]]]) -> None:
    rows = list(columns[0][1])
    width = max(map(len, rows)) + 2
    print("".ljust(width) + "".join(name.rjust(16) for name, _ in columns))
    for row in rows:
        print(row.ljust(width) + "".join(values.get(row, "-").rjust(16) for _, values in columns))


if __name__ == "__main__":
    main()
