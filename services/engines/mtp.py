"""MTP (the Talker's code predictor): one frame's residual codebooks 1..15 from the Talker's hidden and codebook 0.

Per frame it runs the reference module `Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration` the way
`Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation` does through `generate`: prefill
`[talker_hidden, embed(c0)]`, then 14 steps, step i embedding code i with `codec_embedding[i-1]` and predicting code
i+1 with `lm_head[i]`. The sum of the 16 codebook embeddings is the Talker's next input (before adding text).
No state survives a frame, so a batch holds independent requests, one row each (`services.batching` gathers the
frames of concurrent requests into one call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import StaticCache
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration as CodePredictor,
)

from services.checkpoint.loading import Checkpoint, load_pretrained_part, parameter_bytes
from services.config import EngineConfig
from services.engines.sampling import SamplingParams, draw, warpers
from services.errors import InvalidInput

# What the reference's code predictor uses when the Talker samples (prepare_inputs_for_generation); greedy otherwise.
MTP_SAMPLING = SamplingParams(greedy=False, top_k=50, top_p=0.8)


@dataclass
class MTPResult:
    codes: Tensor  # [B, 16] long: c0 followed by the 15 residual codes
    embed_sum: Tensor  # [B, H] sum of the 16 codebook embeddings = the Talker's next input before adding text


class MTPEngine:
    def __init__(self, predictor: CodePredictor, c0_embedding: nn.Embedding, device: torch.device):
        self.predictor = predictor
        self.c0_embedding = c0_embedding  # the Talker's codec_embedding: codebook 0 is the Talker's own vocabulary
        self.device = device
        self.num_code_groups = predictor.config.num_code_groups
        self.vocab_size = c0_embedding.num_embeddings
        self.parameter_bytes = parameter_bytes(predictor, c0_embedding)
        self._warpers = warpers(MTP_SAMPLING)
        self._caches: dict[int, StaticCache] = {}  # by batch size bucket: the 16-step cache, allocated once
        self._fixed: dict[tuple[int, int], tuple] = {}  # by bucket and step: positions, causal mask, RoPE (`_step`)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint | str | Path, config: EngineConfig = EngineConfig()) -> "MTPEngine":
        if not isinstance(ckpt, Checkpoint):
            ckpt = Checkpoint.open(ckpt)
        talker_config = ckpt.config.talker_config
        predictor = load_pretrained_part(
            CodePredictor, talker_config.code_predictor_config, ckpt.read("talker.code_predictor."),
            config.device, config.torch_dtype,
        )
        weight = ckpt.read_one("talker.model.codec_embedding.weight")
        c0_embedding = nn.Embedding.from_pretrained(weight.to(config.device, config.torch_dtype), freeze=True)
        return cls(predictor, c0_embedding, torch.device(config.device))

    @torch.inference_mode()
    def predict(
        self, hidden: Tensor, c0: Tensor, greedy: bool | Sequence[bool] = True,
        generator: torch.Generator | None | Sequence[torch.Generator | None] = None,
    ) -> MTPResult:
        """hidden: [B, H] Talker last-layer hidden of each request's frame, c0: [B] its codebook-0 ids.

        Rows are independent requests, each with its own sampling: `greedy` and `generator` are one value for every
        row or one per row. A greedy row takes the argmax (as the reference does when the Talker is greedy); a
        sampled row draws from MTP_SAMPLING with its own generator, alone, so its codes do not depend on the rows
        it is batched with. The 15 steps run over a preallocated cache of the batch's size bucket (padded rows)."""
        self.check_frames(hidden, c0)
        rows = hidden.shape[0]
        greedy = [greedy] * rows if isinstance(greedy, bool) else list(greedy)
        generators = list(generator) if isinstance(generator, Sequence) else [generator] * rows
        if len(greedy) != rows or len(generators) != rows:
            raise InvalidInput(f"MTP wants one greedy flag and generator per row, got {len(greedy)} and "
                               f"{len(generators)} for {rows} rows")
        c0 = c0.to(self.device, torch.long)
        model = self.predictor.model
        hidden = hidden.to(self.device, self.c0_embedding.weight.dtype)
        size = _bucket(rows)
        if size > rows:  # pad with copies of row 0, dropped below: fixed shapes per bucket
            hidden = torch.cat([hidden, hidden[:1].expand(size - rows, -1)])
            c0 = torch.cat([c0, c0[:1].expand(size - rows)])
        cache = self._cache(size)
        embeds = [self.c0_embedding(c0)]
        codes = [c0]
        step_input = torch.stack((hidden, embeds[0]), dim=1)  # [B, 2, H]
        for i in range(self.num_code_groups - 1):
            if i > 0:
                embeds.append(model.codec_embedding[i - 1](codes[-1]))
                step_input = embeds[-1][:, None]
            last = self._step(i, step_input, cache)[:, -1]
            codes.append(self._draw(self.predictor.lm_head[i](last).float(), greedy, generators))
        embeds.append(model.codec_embedding[-1](codes[-1]))
        return MTPResult(codes=torch.stack(codes, dim=1)[:rows],
                         embed_sum=torch.stack(embeds, dim=1).sum(dim=1)[:rows])

    def _step(self, i: int, step_input: Tensor, cache: StaticCache) -> Tensor:
        """Step i (0: the prefill of hidden and c0's embedding) through the model's layers and final norm: its
        `forward` less the per-call work (its wrappers, the causal mask, the RoPE tables), which is the same for
        each step of a batch size, so made once by the model's own functions and kept. A tiny checkpoint's step
        costs a third less."""
        model = self.predictor.model
        size, n = step_input.shape[:2]
        fixed = self._fixed.get((size, i))
        if fixed is None:  # what `forward` computes from the same inputs
            first = 0 if i == 0 else i + 1
            positions = torch.arange(first, first + n, device=self.device)
            position_ids = positions[None]
            mask = create_causal_mask(config=model.config, inputs_embeds=step_input, attention_mask=None,
                                      past_key_values=cache, position_ids=position_ids)
            fixed = self._fixed[(size, i)] = (positions, position_ids, mask, model.rotary_emb(step_input, position_ids))
        positions, position_ids, mask, rope = fixed
        hidden = step_input
        for layer in model.layers[:model.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                           use_cache=True, position_embeddings=rope, cache_position=positions)
        return model.norm(hidden)

    def check_frames(self, hidden: Tensor, c0: Tensor) -> None:
        """hidden [B, H] and c0 [B] of codebook-0 ids in range, or InvalidInput: checked before a frame joins a
        batch too, so that one request's bad frame never fails a step shared with others."""
        if hidden.ndim != 2 or tuple(c0.shape) != tuple(hidden.shape[:1]):
            raise InvalidInput(f"MTP wants hidden [B, H] and c0 [B], got {tuple(hidden.shape)} and {tuple(c0.shape)}")
        if bool(((c0 < 0) | (c0 >= self.vocab_size)).any()):
            raise InvalidInput(f"codebook-0 ids must be in [0, {self.vocab_size}), got {c0.tolist()}")

    def _draw(self, scores: Tensor, greedy: list[bool], generators: list) -> Tensor:
        ids = scores.argmax(dim=-1)
        for row, (row_greedy, gen) in enumerate(zip(greedy, generators)):
            if not row_greedy:
                ids[row] = draw(self._warpers(None, scores[row:row + 1]), False, gen)[0]
        return ids

    def _cache(self, size: int) -> StaticCache:
        """The batch size bucket's cache, allocated on its first use and reset (zeroed) for each call."""
        cache = self._caches.get(size)
        if cache is None:
            cache = self._caches[size] = StaticCache(config=self.predictor.config, max_cache_len=self.num_code_groups)
        else:
            cache.reset()
        return cache


def _bucket(rows: int) -> int:
    """Batch sizes run as the next power of two: few shapes (and caches) for any mix of requests."""
    return 1 << (rows - 1).bit_length()
