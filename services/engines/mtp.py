"""MTP (the Talker's code predictor): one frame's residual codebooks 1..15 from the Talker's hidden and codebook 0.

Per frame it runs the reference module `Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration` the way
`Qwen3OmniMoeTalkerForConditionalGeneration.prepare_inputs_for_generation` does through `generate`: prefill
`[talker_hidden, embed(c0)]`, then 14 steps, step i embedding code i with `codec_embedding[i-1]` and predicting code
i+1 with `lm_head[i]`. The sum of the 16 codebook embeddings is the Talker's next input (before adding text).
No state survives a frame, so a batch holds independent requests, one row each (`services.batching` gathers the
frames of concurrent requests into one call).

A step runs the reference layers' arithmetic op for op (`_decoder_layer`: the same torch calls on the same tensors,
so the same bits), without their module, cache and attention-dispatch wrappers, over a preallocated cache: at the
tiny checkpoint's widths those wrappers were a fifth of a frame's time, and MTP is on every frame's path.

Steps are replayed from traces (`services.engines.replay`: the same ops, without the GIL): a batch of greedy rows
runs its whole frame as one replay per batch size bucket; one with sampled rows replays each step's scores and
draws between them in Python, as each sampled row needs its own generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import pack_gqa, repeat_kv, use_gqa_in_sdpa
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeRMSNorm,
    Qwen3OmniMoeTalkerCodePredictorDecoderLayer,
    rotate_half,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeTalkerCodePredictorModelForConditionalGeneration as CodePredictor,
)

from services.checkpoint.loading import Checkpoint, load_pretrained_part, parameter_bytes
from services.config import EngineConfig
from services.engines.replay import Replays
from services.engines.sampling import SamplingParams, apply_processors, draw, greedy_ids, warpers
from services.errors import CheckpointError, InvalidInput

# What the reference's code predictor uses when the Talker samples (prepare_inputs_for_generation); greedy otherwise.
MTP_SAMPLING = SamplingParams(greedy=False, top_k=50, top_p=0.8)


@dataclass
class MTPResult:
    codes: Tensor  # [B, 16] long: c0 followed by the 15 residual codes
    embed_sum: Tensor  # [B, H] sum of the 16 codebook embeddings = the Talker's next input before adding text


@dataclass
class _Bucket:
    """What a batch size bucket's frames reuse: each layer's keys and values ([size, kv_heads, 16, head_dim]),
    zeroed for each frame (no row's values outlive its frame), and each step's positions, causal mask and RoPE
    tables."""

    cache: list[tuple[Tensor, Tensor]]
    fixed: list[tuple] = field(default_factory=list)


class MTPEngine:
    def __init__(self, predictor: CodePredictor, c0_embedding: nn.Embedding, device: torch.device,
                 replay: bool = True):
        """`replay`: False runs every step eagerly (the tests compare the two)."""
        # Inference only; and a trace keeps the weights as constants, which must not need grad.
        self.predictor = predictor.requires_grad_(False)
        self.c0_embedding = c0_embedding.requires_grad_(False)  # the Talker's: codebook 0 is its own vocabulary
        self.device = device
        self.num_code_groups = predictor.config.num_code_groups
        self.vocab_size = c0_embedding.num_embeddings
        self.parameter_bytes = parameter_bytes(predictor, c0_embedding)
        self._warpers = warpers(MTP_SAMPLING)
        config = predictor.config
        if config._attn_implementation != "sdpa" or set(config.layer_types) != {"full_attention"}:
            raise CheckpointError(f"MTP runs the code predictor's sdpa attention over full-attention layers; this "
                                  f"one has {config._attn_implementation!r} attention and layers {config.layer_types}")
        self._layers = list(predictor.model.layers[:config.num_hidden_layers])
        self._buckets: dict[int, _Bucket] = {}  # by batch size bucket
        self._greedy = Replays("MTP", self._greedy_frame, replay)  # by bucket: a frame of greedy rows
        self._steps = [Replays("MTP", self._step_scores(i), replay)  # by bucket: step i's scores
                       for i in range(self.num_code_groups - 1)]

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
        hidden = hidden.to(self.device, self.c0_embedding.weight.dtype)
        size = _bucket(rows)
        if size > rows:  # pad with copies of row 0, dropped below: fixed shapes per bucket
            hidden = torch.cat([hidden, hidden[:1].expand(size - rows, -1)])
            c0 = torch.cat([c0, c0[:1].expand(size - rows)])
        self._bucket_of(size)
        if all(greedy):
            codes, embed_sum = self._greedy(size, hidden, c0)
        else:
            codes, embed_sum = self._frame(
                hidden, c0, lambda i, x: self._draw(self._steps[i](size, x), greedy, generators))
        return MTPResult(codes=codes[:rows], embed_sum=embed_sum[:rows])

    def warm(self, max_batch: int = 1) -> None:
        """Trace the frames (greedy and sampled) of each bucket up to `max_batch` rows now, not on the first frame of
        that size (0.13 s each at the tiny checkpoint's widths, 2.5 s up to 8 rows); larger buckets are traced at
        their first frame."""
        for rows in sorted({_bucket(rows) for rows in range(1, max(1, max_batch) + 1)}):
            hidden = self.c0_embedding.weight.new_zeros(rows, self.c0_embedding.embedding_dim)
            c0 = torch.zeros(rows, dtype=torch.long, device=self.device)
            self.predict(hidden, c0, True)
            self.predict(hidden, c0, False, torch.Generator(self.device).manual_seed(0))

    def _greedy_frame(self, hidden: Tensor, c0: Tensor) -> tuple[Tensor, Tensor]:
        return self._frame(hidden, c0, lambda i, x: greedy_ids(self._scores(i, x)))

    def _frame(self, hidden: Tensor, c0: Tensor, next_code) -> tuple[Tensor, Tensor]:
        """Codes [B, 16] and their embeddings' sum [B, H] of a frame: step 0 prefills hidden and c0's embedding,
        step i > 0 embeds code i with `codec_embedding[i-1]`; `next_code(i, step input)` gives code i + 1."""
        model = self.predictor.model
        for keys, values in self._buckets[int(hidden.shape[0])].cache:
            keys.zero_()
            values.zero_()
        embeds = [self.c0_embedding(c0)]
        codes = [c0]
        step_input = torch.stack((hidden, embeds[0]), dim=1)  # [B, 2, H]
        for i in range(self.num_code_groups - 1):
            if i > 0:
                embeds.append(model.codec_embedding[i - 1](codes[-1]))
                step_input = embeds[-1][:, None]
            codes.append(next_code(i, step_input))
        embeds.append(model.codec_embedding[-1](codes[-1]))
        return torch.stack(codes, dim=1), torch.stack(embeds, dim=1).sum(dim=1)

    def _step_scores(self, i: int):
        # A named function, not a functools.partial: torch.jit.trace names its trace after what it traces.
        def scores(step_input: Tensor) -> Tensor:
            return self._scores(i, step_input)

        return scores

    def _scores(self, i: int, step_input: Tensor) -> Tensor:
        """Step i's scores [B, vocab] (float32): the layers, the final norm, and `lm_head[i]` at the last position."""
        bucket = self._buckets[int(step_input.shape[0])]
        positions, mask, cos, sin = bucket.fixed[i]
        hidden = step_input
        for layer, (keys, values) in zip(self._layers, bucket.cache, strict=True):
            hidden = _decoder_layer(layer, hidden, positions, mask, cos, sin, keys, values)
        return self.predictor.lm_head[i](_rms_norm(self.predictor.model.norm, hidden)[:, -1]).float()

    def check_frames(self, hidden: Tensor, c0: Tensor) -> None:
        """hidden [B, H] and c0 [B] of codebook-0 ids in range, or InvalidInput: checked before a frame joins a
        batch too, so that one request's bad frame never fails a step shared with others."""
        if hidden.ndim != 2 or tuple(c0.shape) != tuple(hidden.shape[:1]):
            raise InvalidInput(f"MTP wants hidden [B, H] and c0 [B], got {tuple(hidden.shape)} and {tuple(c0.shape)}")
        if bool(((c0 < 0) | (c0 >= self.vocab_size)).any()):
            raise InvalidInput(f"codebook-0 ids must be in [0, {self.vocab_size}), got {c0.tolist()}")

    def _draw(self, scores: Tensor, greedy: list[bool], generators: list) -> Tensor:
        """Each row's code: the argmax, or a draw with the row's own generator. The warpers (top-k, top-p) are the
        same for every sampled row and work on each row alone, so one call serves them all (a frame of 6 sampled
        rows: 22.4 -> 17.3 ms; most of the rest is each row's `torch.multinomial`)."""
        ids = greedy_ids(scores)
        sampled = [row for row, row_greedy in enumerate(greedy) if not row_greedy]
        if sampled:
            warped = apply_processors(self._warpers, None, scores[sampled])
            for i, row in enumerate(sampled):
                ids[row] = draw(warped[i:i + 1], False, generators[row])[0]
        return ids

    def _bucket_of(self, size: int) -> _Bucket:
        """The bucket's cache and tables, made at its first use. The tables are the same for each frame: the mask
        is the one transformers' `create_causal_mask` makes for a static cache of 16 positions (none at step 0,
        whose two positions attend causally; then every position up to the step's own)."""
        bucket = self._buckets.get(size)
        if bucket is not None:
            return bucket
        like = self.c0_embedding.weight
        cache = []
        for layer in self._layers:  # the layer's own attention sizes
            attn = layer.self_attn
            shape = (size, attn.config.num_key_value_heads, self.num_code_groups, attn.head_dim)
            cache.append((like.new_zeros(shape), like.new_zeros(shape)))
        bucket = _Bucket(cache)
        for i in range(self.num_code_groups - 1):
            first, n = (0, 2) if i == 0 else (i + 1, 1)
            positions = torch.arange(first, first + n, device=self.device)
            mask = None if i == 0 else (torch.arange(self.num_code_groups, device=self.device) <= first).expand(
                size, 1, 1, self.num_code_groups).contiguous()
            cos, sin = self.predictor.model.rotary_emb(like.new_zeros(size, n, like.shape[1]), positions[None])
            bucket.fixed.append((positions, mask, cos.unsqueeze(1), sin.unsqueeze(1)))
        self._buckets[size] = bucket
        return bucket


EXACT_ROWS = 8  # batch sizes up to this run as they are; larger ones as the next power of two


def _bucket(rows: int) -> int:
    """The batch size a frame of `rows` runs as: itself up to EXACT_ROWS (6 rows padded to 8 took 3.09 ms a frame at
    the tiny widths, 2.82 ms as they are), else the next power of two: few shapes (and caches) for any mix of
    requests."""
    return rows if rows <= EXACT_ROWS else 1 << (rows - 1).bit_length()


def _rms_norm(norm: Qwen3OmniMoeRMSNorm, x: Tensor) -> Tensor:
    """`Qwen3OmniMoeRMSNorm.forward`."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _decoder_layer(layer: Qwen3OmniMoeTalkerCodePredictorDecoderLayer, x: Tensor, positions: Tensor,
                   mask: Tensor | None, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """The layer's `forward` with sdpa attention and a static cache (`keys`, `values`: [B, kv_heads, 16, head_dim],
    written at `positions`), as the reference runs it: the attention's projections, q/k norms, RoPE
    (`apply_rotary_pos_emb`), `StaticLayer.update`, `sdpa_attention_forward` (its grouped-query choice: its own
    `use_gqa_in_sdpa`, else packed queries for one position, repeated keys for more), then the MLP."""
    attn, mlp = layer.self_attn, layer.mlp
    b, n = int(x.shape[0]), int(x.shape[1])  # Python ints, also while traced
    heads = (b, n, -1, attn.head_dim)
    residual = x
    h = _rms_norm(layer.input_layernorm, x)
    q = _rms_norm(attn.q_norm, F.linear(h, attn.q_proj.weight, attn.q_proj.bias).view(heads)).transpose(1, 2)
    k = _rms_norm(attn.k_norm, F.linear(h, attn.k_proj.weight, attn.k_proj.bias).view(heads)).transpose(1, 2)
    v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias).view(heads).transpose(1, 2)
    q = (q * cos) + (rotate_half(q) * sin)
    k = (k * cos) + (rotate_half(k) * sin)
    keys.index_copy_(2, positions, k)
    values.index_copy_(2, positions, v)
    groups, extra, causal = attn.num_key_value_groups, {}, mask is None and n > 1
    query, key, value, attn_mask = q, keys, values, mask
    if groups > 1 and use_gqa_in_sdpa(mask, keys, values):
        extra["enable_gqa"] = True
    elif groups > 1 and n == 1:
        query, attn_mask = pack_gqa(q, groups), pack_gqa(mask, groups)
    elif groups > 1:
        key, value = repeat_kv(keys, groups), repeat_kv(values, groups)
    if causal and key.shape[2] > n:  # the keys past the new positions are not there yet
        key, value = key[:, :, :n], value[:, :, :n]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=0.0, scale=attn.scaling,
                                         is_causal=causal, **extra)
    out = out.reshape(out.shape[0], -1, n, value.shape[-1]).transpose(1, 2).contiguous()
    x = residual + F.linear(out.reshape(b, n, -1).contiguous(), attn.o_proj.weight, attn.o_proj.bias)
    residual = x
    h = _rms_norm(layer.post_attention_layernorm, x)
    h = F.linear(mlp.act_fn(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight), mlp.down_proj.weight)
    return residual + h
