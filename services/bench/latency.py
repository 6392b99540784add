"""`omni bench latency`: the reference `generate` against the streaming conductor, side by side in one run.

For each checkpoint (the tiny one, and a wider random one with the real Talker/MTP/Code2Wav widths and a narrow
Thinker) and each prompt, it runs the reference greedily, then the conductor on the same input, checks that both
produced the same tokens and codes, and prints: reference wall time, the conductor's time to first text token,
time to first audio packet, total time and RTF, with the two ratios the goals are stated in:
first audio / reference total (goal <= 0.15 for a 200-token answer) and conductor total / reference total
(goal <= 1.2).

With `--address HOST:PORT --model DIR` it benchmarks the checkpoint a running deployment (`omni serve`) serves, and
runs every turn a third time through the deployment's Omni API, timed at the client, next to the in-process
conductor (goal: first audio packet within 1.5x of in-process).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_REAL_CONFIG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / \
    "qwen3-omni-30b-a3b-instruct.config.json"

PROMPTS = [
    ("text", dict(text="Tell me a story about a lighthouse keeper.")),
    ("audio", dict(text="What do you hear?", audio=True)),
]


def wide_config(real_config_path: Path, talker_layers: int, talker_experts: int):
    """Real widths for the Talker, MTP and Code2Wav (fewer Talker layers/experts to fit a CPU), a narrow Thinker."""
    from transformers import Qwen3OmniMoeConfig

    from services.checkpoint.tiny import TINY_CONFIG

    real = json.loads(real_config_path.read_text())
    cfg = copy.deepcopy(TINY_CONFIG)
    thinker_text = cfg["thinker_config"]["text_config"]
    thinker_text.update(hidden_size=256, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                        moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2, num_hidden_layers=4)
    thinker_text["rope_parameters"]["mrope_section"] = [4, 6, 6]
    cfg["thinker_config"]["audio_config"]["output_dim"] = 256
    cfg["thinker_config"]["vision_config"]["out_hidden_size"] = 256
    talker = cfg["talker_config"]
    talker["text_config"] = copy.deepcopy(real["talker_config"]["text_config"])
    talker["text_config"].update(num_hidden_layers=talker_layers, num_experts=talker_experts)
    talker["text_config"].pop("num_local_experts", None)
    talker["code_predictor_config"] = copy.deepcopy(real["talker_config"]["code_predictor_config"])
    talker.update(thinker_hidden_size=256, accept_hidden_layer=2)
    cfg["code2wav_config"] = copy.deepcopy(real["code2wav_config"])
    return Qwen3OmniMoeConfig(**cfg)


def _media(tmp: Path) -> str:
    import numpy as np
    import soundfile as sf

    t = np.arange(2 * 16000) / 16000
    path = tmp / "chirp.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32), 16000)
    return str(path)


async def _conduct(conductor, req) -> dict:
    from services.events import TurnSummary

    async for event in conductor.run(req):
        if isinstance(event, TurnSummary):
            return event


async def _served(address: str, req) -> dict:
    """The same turn through a deployment's Omni API, timed at the client."""
    from services.client import OmniClient
    from services.events import AudioChunk, TextDelta, TurnSummary

    t0 = time.perf_counter()
    marks, summary = {}, None
    async with OmniClient(address) as client:
        async for event in client.converse(parts=req.parts, greedy=True,
                                           max_new_tokens=req.max_new_tokens, max_audio_frames=req.max_audio_frames):
            now = time.perf_counter() - t0
            if isinstance(event, TextDelta):
                marks.setdefault("ttft", now)
            elif isinstance(event, AudioChunk):
                marks.setdefault("first_audio", now)
            elif isinstance(event, TurnSummary):
                summary = event
    total = time.perf_counter() - t0
    return dict(summary=summary, total=total, rtf=total / max(summary.num_samples / summary.sample_rate, 1e-9),
                **marks)


def bench_checkpoint(name: str, model_dir: Path, args, tmp: Path, address: str | None = None) -> list[dict]:
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from services.conductor import Conductor, TurnRequest
    from services.config import EngineConfig
    from services.engines.bundle import Engines
    from services.engines.sampling import SamplingParams
    from services.preprocess import build_turn
    from services.stages import Stages
    from services.turn_parts import audio_part, text_part

    reference = Qwen3OmniMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    reference.talker.config.audio_config = reference.config.thinker_config.audio_config  # DESIGN.md s4 bug
    engines = Engines.load(model_dir, EngineConfig())
    conductor = Conductor(Stages.local(engines))
    audio = _media(tmp)
    rows = []
    # Warm both paths up once (first-call allocations, lazy imports) so neither pays it in the table.
    warm = TurnRequest(parts=[text_part("warm up")], max_new_tokens=3, max_audio_frames=3,
                       thinker_sampling=SamplingParams(greedy=True))
    with torch.inference_mode():
        reference.generate(**build_turn(engines.processor, parts=warm.parts).processor_outputs,
                           thinker_max_new_tokens=3, talker_max_new_tokens=3,
                           thinker_do_sample=False, talker_do_sample=False)
    asyncio.run(_conduct(conductor, warm))
    if address:
        asyncio.run(_served(address, warm))
    for prompt_name, spec in PROMPTS:
        parts = [audio_part(audio)] if spec.get("audio") else []
        req = TurnRequest(parts=[*parts, text_part(spec["text"])], max_new_tokens=args.tokens,
                          max_audio_frames=args.frames, thinker_sampling=SamplingParams(greedy=True))
        inputs = build_turn(engines.processor, parts=req.parts).processor_outputs
        t = time.perf_counter()
        with torch.inference_mode():
            seq, _ = reference.generate(**inputs, thinker_max_new_tokens=args.tokens,
                                        talker_max_new_tokens=args.frames,
                                        thinker_do_sample=False, talker_do_sample=False)
        ref_total = time.perf_counter() - t
        summary = asyncio.run(_conduct(conductor, req))
        same = summary.thinker_token_ids == seq[0, inputs["input_ids"].shape[1]:].tolist()
        tm = summary.timings
        rows.append(dict(
            checkpoint=name, prompt=prompt_name, tokens=len(summary.thinker_token_ids), frames=len(summary.codes),
            ref_total=ref_total, ttft=tm["time_to_first_text_s"], first_audio=tm["time_to_first_audio_s"],
            total=tm["total_s"], rtf=tm.get("rtf", float("nan")), same_tokens=same,
        ))
        print_row(rows[-1])
        if address:
            served = asyncio.run(_served(address, req))
            rows.append(dict(
                checkpoint="served", prompt=prompt_name, tokens=len(served["summary"].thinker_token_ids),
                frames=len(served["summary"].codes), ref_total=ref_total, ttft=served["ttft"],
                first_audio=served["first_audio"], total=served["total"], rtf=served["rtf"],
                same_tokens=served["summary"].thinker_token_ids == summary.thinker_token_ids
                and served["summary"].codes == summary.codes,
            ))
            print_row(rows[-1])
            print(f"{'':<16}served / in-process first audio: {served['first_audio'] / tm['time_to_first_audio_s']:.2f}x "
                  f"(goal <= 1.5)", flush=True)
    return rows


HEADER = (f"{'checkpoint':<8} {'prompt':<6} {'tok':>4} {'frames':>6} {'ref total':>10} {'TTFT':>8} "
          f"{'1st audio':>10} {'total':>8} {'RTF':>6} {'1st/ref':>8} {'tot/ref':>8} {'same ids':>8}")


def print_row(r: dict) -> None:
    print(f"{r['checkpoint']:<8} {r['prompt']:<6} {r['tokens']:>4} {r['frames']:>6} {r['ref_total']:>9.2f}s "
          f"{r['ttft'] * 1e3:>6.0f}ms {r['first_audio'] * 1e3:>8.0f}ms {r['total']:>7.2f}s {r['rtf']:>6.2f} "
          f"{r['first_audio'] / r['ref_total']:>8.3f} {r['total'] / r['ref_total']:>8.2f} "
          f"{'yes' if r['same_tokens'] else 'NO':>8}", flush=True)


def main(argv: list[str] | None = None) -> None:
    from services.checkpoint.tiny import tiny_config, write_random_checkpoint

    p = argparse.ArgumentParser(prog="omni bench latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=200, help="Thinker answer length (greedy, random weights)")
    p.add_argument("--frames", type=int, default=250, help="Talker frame cap")
    p.add_argument("--real-config", type=Path, default=DEFAULT_REAL_CONFIG,
                   help="the real model's config.json, for the wide checkpoint's Talker/MTP/Code2Wav widths")
    p.add_argument("--talker-layers", type=int, default=4, help="wide checkpoint: Talker layers (real: 20)")
    p.add_argument("--talker-experts", type=int, default=16, help="wide checkpoint: Talker experts (real: 128)")
    p.add_argument("--skip-wide", action="store_true", help="only the tiny checkpoint")
    p.add_argument("--address", help="also run every turn through this deployment (omni serve) and compare; "
                                     "needs --model, the checkpoint it serves")
    p.add_argument("--model", type=Path, help="with --address: the deployment's checkpoint directory")
    args = p.parse_args(argv)
    import transformers

    from services.workers import threads_summary

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"reference generate vs streaming conductor, greedy, {args.tokens} Thinker tokens, "
          f"<= {args.frames} frames, {threads_summary()}")
    print(HEADER)
    if args.address and not args.model:
        p.error("--address needs --model, the checkpoint the deployment serves")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.address:
            bench_checkpoint(args.model.name, args.model, args, tmp, address=args.address)
            return
        bench_checkpoint("tiny", write_random_checkpoint(tmp / "tiny", tiny_config()), args, tmp)
        if args.skip_wide:
            return
        if not args.real_config.is_file():
            print(f"wide: skipped, {args.real_config} not found (pass --real-config)")
            return
        cfg = wide_config(args.real_config, args.talker_layers, args.talker_experts)
        bench_checkpoint("wide", write_random_checkpoint(tmp / "wide", cfg), args, tmp)


if __name__ == "__main__":
    main()
