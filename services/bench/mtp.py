"""`omni bench mtp`: one MTP step (15 residual codebooks for B frames) at batch 1, 8 and 32, ours against the
reference code predictor's `generate` (what `Qwen3OmniMoeTalkerForConditionalGeneration` runs per frame), side by
side in one run, on the tiny checkpoint's dimensions and on the real model's (random weights).

Prints per step and per frame, the step's cost at batch B against batch 1 (goal: batch 8 within 2x of batch 1),
and checks that every batch gives each frame the codes it gets alone (and how far its float output moves).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTalkerCodePredictorConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration as CodePredictor,
)

from services.engines.mtp import MTPEngine

DEFAULT_REAL_CONFIG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / \
    "qwen3-omni-30b-a3b-instruct.config.json"


def engine(predictor_config: dict, c0_vocab: int, seed: int = 0) -> MTPEngine:
    torch.manual_seed(seed)
    config = Qwen3OmniMoeTalkerCodePredictorConfig(**predictor_config)
    predictor = CodePredictor(config).eval()
    c0_embedding = nn.Embedding(c0_vocab, config.hidden_size)
    return MTPEngine(predictor, c0_embedding, torch.device("cpu"))


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.inference_mode()
def reference_step(mtp: MTPEngine, hidden: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """The reference's per-frame call: generate 15 codes from [talker_hidden, embed(c0)] (greedy)."""
    embeds = torch.stack((hidden, mtp.c0_embedding(c0)), dim=1)
    out = mtp.predictor.generate(inputs_embeds=embeds, max_new_tokens=mtp.num_code_groups - 1, do_sample=False,
                                 min_new_tokens=mtp.num_code_groups - 1)
    return out


def bench(name: str, mtp: MTPEngine, batches: list[int], repeats: int) -> None:
    hidden_size = mtp.c0_embedding.embedding_dim
    gen = torch.Generator().manual_seed(0)
    base = None
    for b in batches:
        hidden = torch.randn(b, hidden_size, generator=gen)
        c0 = torch.randint(0, mtp.vocab_size, (b,), generator=gen)
        ours = _timed(lambda: mtp.predict(hidden, c0), repeats)
        ref = _timed(lambda: reference_step(mtp, hidden, c0), max(1, repeats // 2))
        batched = mtp.predict(hidden, c0)
        alone = [mtp.predict(hidden[i:i + 1], c0[i:i + 1]) for i in range(b)]
        same = bool((batched.codes == torch.cat([a.codes for a in alone])).all())
        diff = float((batched.embed_sum - torch.cat([a.embed_sum for a in alone])).abs().max())
        base = base or ours
        print(f"{name:5} {b:5d} {ours * 1e3:10.2f} {ours / b * 1e3:10.3f} {ours / base:9.2f}x "
              f"{ref * 1e3:10.2f} {ref / b * 1e3:10.3f} {ref / ours:8.2f}x  {'yes' if same else 'NO':>5} {diff:10.2e}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="omni bench mtp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32", help="batch sizes (frames per step)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per batch size")
    p.add_argument("--real-config", type=Path, default=DEFAULT_REAL_CONFIG,
                   help="the real model's config.json, for the real MTP dimensions")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    from services.checkpoint.tiny import TINY_CONFIG

    print(f"{'dims':5} {'batch':>5} {'ms/step':>10} {'ms/frame':>10} {'vs b=1':>10} "
          f"{'ref ms':>10} {'ref/frame':>10} {'ref/ours':>9}  {'same codes batched as alone':>5} "
          "max |embed_sum batched - alone|")
    tiny = TINY_CONFIG["talker_config"]
    bench("tiny", engine(tiny["code_predictor_config"], tiny["text_config"]["vocab_size"]), batches, args.repeats)
    if args.real_config.is_file():
        real = json.loads(args.real_config.read_text())["talker_config"]
        bench("real", engine(real["code_predictor_config"], real["text_config"]["vocab_size"]), batches,
              args.repeats)
    else:
        print(f"real: skipped, {args.real_config} not found (pass --real-config)")


if __name__ == "__main__":
    main()
