"""Thinker engine: prefill a multimodal prompt, then decode one token at a time. It never samples.

The math is transformers' `Qwen3OmniMoeThinkerTextModel` (from `thinker.model.*`) and the `thinker.lm_head` Linear;
this module re-does only what `Qwen3OmniMoeThinkerModel.forward` and `generate` do around them, step by step:
scatter encoder embeddings at the placeholder tokens, join the deepstack features of images and videos, build
TM-RoPE positions (see `positions.py`), keep each request's KV in the replica's paged cache (`kv_pages.py`), and
return the hidden states of layer `talker_config.accept_hidden_layer` at the multimodal positions, which the Talker
consumes. Prompts prefill in chunks of `prefill_chunk` tokens (`prefill_batch`: the next chunk of several prompts as
one padded forward), and `decode_batch` runs one step of many requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeThinkerTextModel,
    _get_feat_extract_output_lengths,
)

from services.checkpoint.loading import Checkpoint, load_pretrained_part, parameter_bytes
from services.config import EngineConfig, KVConfig
from services.engines.kv_pages import KEEP_SESSION, KVPool, KVSession, padded_chunks, prefill_chunks, prefill_whole
from services.engines.prefix import MarkerIds, ParkedPrefix, Segment, reusable_tokens
from services.engines.positions import PromptLayout, TMRoPE, step_positions
from services.engines.vision_encoder import VisionEmbeddings
from services.errors import InvalidInput, ResourceExhausted

MODEL_PREFIX = "thinker.model."
LM_HEAD_PREFIX = "thinker.lm_head."
DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass
class ThinkerPrompt(PromptLayout):
    """The layout (`input_ids`, and what places its media) and the encoders' embeddings."""

    audio_embeds: Tensor | None = None  # [N_audio, D] from AudioEncoderEngine.encode
    image: VisionEmbeddings | None = None
    video: VisionEmbeddings | None = None
    # Prefix reuse (`services.engines.prefix`): the replica keeps the request's KV under `cache_key` (a session's)
    # when it ends, and a later prompt with that key reuses the prefix it can prove equal, by `segments` (the
    # media's token spans and digests). The embeddings above may then be those of the placeholders at positions
    # >= `embeds_from` only (the media after a reused prefix): the rest are not needed.
    cache_key: str = ""
    segments: tuple[Segment, ...] = ()
    embeds_from: int = 0
    keep: str = KEEP_SESSION  # what becomes of the KV under `cache_key` when the request ends (KEEP_*)
    # The caller holds `mm_hidden` of the placeholders before this one (a turn's earlier prefill): the result's
    # rows start here, or where the reused prefix ends if that is earlier (`ThinkerPrefill.mm_from`).
    hidden_from: int = 0


@dataclass
class ThinkerPrefill:
    logits: Tensor  # [V] float32, next-token logits after the prompt
    mm_hidden: Tensor  # [N_mm, D] layer-`accept_hidden_layer` states at audio/image/video placeholders, prompt order
    mm_from: int = 0  # the caller needs the rows from here on (`ThinkerPrompt.hidden_from`); the earlier ones it has

    @property
    def new_hidden(self) -> Tensor:
        return self.mm_hidden[self.mm_from:]


class ThinkerSession(KVSession):
    """One request's state: its pages of the replica's KV cache, filled up to `length` of `capacity` tokens."""


@dataclass(eq=False)
class ThinkerPrefillJob:
    """A prompt being prefilled chunk by chunk (`ThinkerEngine.prefill_step`), so that one long prompt never holds
    the replica's decode steps for more than a chunk."""

    session: ThinkerSession
    offset: int  # prompt positions before it are in the session's KV already (a reused prefix)
    embeds: Tensor  # [L - offset, D] with the encoders' embeddings scattered in
    position_ids: Tensor  # [4, 1, L - offset]
    mm_mask: Tensor  # [L - offset] audio/image/video placeholders
    visual_mask: Tensor | None  # [L - offset] image/video placeholders, with deepstack [layer][N_visual, D]
    deepstack: list[Tensor] | None
    mm_hidden: list[Tensor] = field(default_factory=list)  # the reused prefix's, then per chunk done
    mm_from: int = 0  # `ThinkerPrefill.mm_from`

    def next_chunk(self, chunk: int) -> tuple[int, int]:
        """The positions [a, b) of `embeds` that the next step of `chunk` tokens runs."""
        a = self.session.length - self.offset
        return a, min(a + chunk, self.embeds.shape[0])


@dataclass(eq=False)
class Reuse:
    """A parked prefix a new prompt takes back (`ThinkerEngine.claim`): its first `tokens` positions."""

    parked: ParkedPrefix
    tokens: int
    redone: int = 0  # 1: it ends at a medium (an audio window) the parked KV holds with other content


class ThinkerEngine:
    def __init__(
        self, model: torch.nn.Module, lm_head: torch.nn.Linear, ckpt_config, config: EngineConfig, max_seq_len: int,
        kv: KVConfig = KVConfig(), replay: bool = True,
    ):
        """`replay`: False runs every decode step eagerly (`KVPool.step`; the tests compare the two)."""
        # Inference only; and a trace keeps the weights as constants, which must not need grad.
        self.model = model.requires_grad_(False)
        self.lm_head = lm_head
        self.config = config
        self.max_seq_len = max_seq_len
        self.prefill_chunk = kv.prefill_chunk
        tc = ckpt_config.thinker_config
        self.thinker_config = tc
        self.vocab_size: int = tc.text_config.vocab_size
        self.hidden_size: int = tc.text_config.hidden_size
        self.num_deepstack: int = len(tc.vision_config.deepstack_visual_indexes)
        self.spatial_merge_size: int = tc.vision_config.spatial_merge_size
        self.accept_hidden_layer: int = ckpt_config.talker_config.accept_hidden_layer
        self.rope = TMRoPE(tc, self.spatial_merge_size)
        self.markers = MarkerIds.from_config(tc)
        self.parameter_bytes = parameter_bytes(model, lm_head)
        self.kv = KVPool(model.config, kv.kv_tokens, kv.page_size, config.device, config.torch_dtype, "thinker",
                         replay)

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint | str | Path, config: EngineConfig = EngineConfig(), max_seq_len: int | None = None,
        kv: KVConfig = KVConfig(), replay: bool = True,
    ) -> "ThinkerEngine":
        """`max_seq_len`: longest prompt + generation a session may hold (default: the model's position limit)."""
        ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)
        text_config = ckpt.config.thinker_config.text_config
        model = load_pretrained_part(
            Qwen3OmniMoeThinkerTextModel, text_config, ckpt.read(MODEL_PREFIX), config.device, config.torch_dtype
        )
        lm_head = torch.nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
        lm_head.load_state_dict(ckpt.read(LM_HEAD_PREFIX))
        lm_head = lm_head.to(config.device, config.torch_dtype).eval()
        return cls(model, lm_head, ckpt.config, config, max_seq_len or text_config.max_position_embeddings, kv, replay)

    @torch.inference_mode()
    def prefill(
        self, prompt: ThinkerPrompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    ) -> tuple[ThinkerSession, ThinkerPrefill]:
        """Run the whole prompt; the session's cache holds room for `max_new_tokens` decode steps after it."""
        job = self.start(prompt, max_new_tokens)
        return prefill_whole(job, self.prefill_step)

    def claim(self, prompt: ThinkerPrompt) -> Reuse | None:
        """Take back the KV parked under the prompt's cache key, if it computes a prefix of this prompt; the caller
        passes it to `start` (which owns it from then on) or `release`s it."""
        parked = self.kv.unpark(prompt.cache_key) if prompt.cache_key else None
        if parked is None:
            return None
        tokens, redone = reusable_tokens(parked, prompt.input_ids, prompt.segments, self.markers.placeholders)
        if tokens == 0:
            parked.slot.close()
            return None
        return Reuse(parked, tokens, redone)

    @staticmethod
    def release(reuse: Reuse | None) -> None:
        if reuse is not None:
            reuse.parked.slot.close()

    def park(self, session: ThinkerSession, prompt: ThinkerPrompt, generated: list[int], mm_hidden: Tensor) -> None:
        """Keep a finished request's KV for the next prompt with its cache key (`claim`), as `prompt.keep` says;
        else free it."""
        length = prompt.input_ids.numel()
        if session.closed or session.length < length:
            session.close()
            return
        ids = torch.cat([prompt.input_ids.view(-1).cpu(), torch.tensor(generated, dtype=torch.long)])
        self.kv.park(prompt.cache_key, ParkedPrefix(session.kv, ids[:session.length], length, prompt.segments,
                                                    mm_hidden), prompt.keep)

    @torch.inference_mode()
    def start(self, prompt: ThinkerPrompt, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
              reuse: Reuse | None = None) -> ThinkerPrefillJob:
        """Check the prompt, reserve its KV (prompt + `max_new_tokens`), and build its input; no forward yet. With
        `reuse` (from `claim`), the session is that KV, and only the prompt after its prefix will run."""
        try:
            return self._start(prompt, max_new_tokens, reuse)
        except BaseException:
            self.release(reuse)
            raise

    def _start(self, prompt: ThinkerPrompt, max_new_tokens: int, reuse: Reuse | None) -> ThinkerPrefillJob:
        if max_new_tokens < 0:
            raise InvalidInput(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        offset = 0 if reuse is None else reuse.tokens
        if offset < prompt.embeds_from:
            raise InvalidInput(f"the prompt's embeddings start at token {prompt.embeds_from}, but this replica holds "
                               f"only its first {offset} tokens")
        masks = self._validate(prompt)
        ids = prompt.input_ids.to(self.config.device)
        length = ids.shape[0]
        capacity = length + max_new_tokens
        if capacity > self.max_seq_len:
            raise ResourceExhausted(
                f"prompt of {length} tokens + {max_new_tokens} new tokens exceeds the Thinker's limit of "
                f"{self.max_seq_len} tokens"
            )
        positions = self.rope.layout_positions(prompt)
        # Only the positions after the reused prefix run: their embeddings are the given ones past it.
        embeds = self.model.embed_tokens(ids[offset:])  # [L - offset, D]
        skip = {m: int(mask[prompt.embeds_from:offset].sum()) for m, mask in masks.items()}  # given, not needed
        masks = {m: mask[offset:] for m, mask in masks.items()}
        for modality, f in _mm_embeds(prompt).items():
            if f is not None:
                embeds[masks[modality]] = f[skip[modality]:].to(embeds.device, embeds.dtype)
        visual_mask, deepstack = self._deepstack(prompt, masks, embeds, skip)
        if reuse is None:
            session = ThinkerSession(kv=self.kv.reserve(capacity), rope_delta=positions.rope_delta)
            prefix_mm, mm_hidden = 0, []
        else:
            self.kv.grow(reuse.parked.slot, capacity)
            reuse.parked.slot.length = offset
            session = ThinkerSession(kv=reuse.parked.slot, rope_delta=positions.rope_delta)
            prefix_mm = int(torch.isin(prompt.input_ids[:offset].cpu(), torch.tensor(self.markers.placeholders)).sum())
            mm_hidden = [reuse.parked.mm_hidden[:prefix_mm]]
        return ThinkerPrefillJob(session, offset, embeds, positions.position_ids[:, :, offset:].to(self.config.device),
                                 mm_mask=masks["audio"] | masks["image"] | masks["video"],
                                 visual_mask=visual_mask, deepstack=deepstack, mm_hidden=mm_hidden,
                                 mm_from=min(prompt.hidden_from, prefix_mm))

    @torch.inference_mode()
    def prefill_batch(self, jobs: list[ThinkerPrefillJob]) -> list[ThinkerPrefill | None | InvalidInput]:
        """The next chunk of several prompts (`prefill_step` of each), those without images or video in it as one
        forward, each padded to the longest (prompts that arrive together: a burst of new turns). A closed session's
        result is its InvalidInput, for its caller to raise."""
        return prefill_chunks(jobs, self.prefill_step, self._prefill_padded, self._visual_chunk,
                              "the Thinker session is closed")

    def _visual_chunk(self, job: ThinkerPrefillJob) -> bool:
        """The job's next chunk holds image or video positions: it runs alone (deepstack features go by position)."""
        a, b = job.next_chunk(self.prefill_chunk)
        return job.visual_mask is not None and bool(job.visual_mask[a:b].any())

    def _prefill_padded(self, jobs: list[ThinkerPrefillJob]) -> list[ThinkerPrefill | None]:
        spans = [job.next_chunk(self.prefill_chunk) for job in jobs]
        embeds, positions, lengths = padded_chunks([(job.embeds[a:b], job.position_ids[:, 0, a:b])
                                                    for job, (a, b) in zip(jobs, spans)])
        out = self.kv.forward(self.model, [job.session.kv for job in jobs], embeds, positions, lengths=lengths,
                              output_hidden_states=[self.accept_hidden_layer])
        hidden = out.hidden_states[self.accept_hidden_layer]
        results = []
        for row, (job, (a, b)) in enumerate(zip(jobs, spans)):
            job.mm_hidden.append(hidden[row, :b - a][job.mm_mask[a:b]])
            if b < job.embeds.shape[0]:
                results.append(None)
                continue
            last = out.last_hidden_state[row:row + 1, b - a - 1:b - a]
            results.append(ThinkerPrefill(logits=self._logits(last)[0], mm_hidden=torch.cat(job.mm_hidden),
                                          mm_from=job.mm_from))
        return results

    @torch.inference_mode()
    def prefill_step(self, job: ThinkerPrefillJob) -> ThinkerPrefill | None:
        """Prefill the job's next chunk (`prefill_chunk` tokens); after the last one, its result."""
        if job.session.closed:
            raise InvalidInput("the Thinker session is closed")
        a, b = job.next_chunk(self.prefill_chunk)  # of the positions to run
        extra = {}
        if job.visual_mask is not None and bool(job.visual_mask[a:b].any()):
            first = int(job.visual_mask[:a].sum())
            count = int(job.visual_mask[a:b].sum())
            extra = {"visual_pos_masks": job.visual_mask[None, a:b],
                     "deepstack_visual_embeds": [d[first:first + count] for d in job.deepstack]}
        out = self.kv.forward(self.model, [job.session.kv], job.embeds[None, a:b], job.position_ids[:, :, a:b],
                              output_hidden_states=[self.accept_hidden_layer], **extra)  # the layer the Talker needs
        job.mm_hidden.append(out.hidden_states[self.accept_hidden_layer][0][job.mm_mask[a:b]])
        if b < job.embeds.shape[0]:
            return None
        return ThinkerPrefill(logits=self._logits(out.last_hidden_state)[0], mm_hidden=torch.cat(job.mm_hidden),
                              mm_from=job.mm_from)

    @torch.inference_mode()
    def decode(self, session: ThinkerSession, token_id: int) -> Tensor:
        """Append `token_id` to the session; return the [V] float32 logits of the token after it."""
        self.check_decode(session, token_id)
        return self.decode_batch([session], [token_id])[0]

    @torch.inference_mode()
    def warm(self, max_batch: int = 1) -> None:
        """Trace the decode step of each batch size up to `max_batch` now (`KVPool.warm`): 0.04 s each at the tiny
        checkpoint's widths, not on the first step of that size."""
        self.kv.warm(self.model, max_batch)

    def check_decode(self, session: ThinkerSession, token_id: int) -> None:
        """What `decode` would refuse, checked before a step joins a batch: one request's error never fails a step
        shared with others."""
        if session.closed:
            raise InvalidInput("the Thinker session is closed")
        if not 0 <= token_id < self.vocab_size:
            raise InvalidInput(f"token id {token_id} is outside the Thinker vocabulary [0, {self.vocab_size})")
        if session.length >= session.capacity:
            raise ResourceExhausted(
                f"the Thinker session is full ({session.capacity} tokens); prefill with a larger max_new_tokens"
            )

    @torch.inference_mode()
    def decode_batch(self, sessions: list[ThinkerSession], token_ids: list[int]) -> Tensor:
        """One decode step of several requests (checked with `check_decode`): [B, V] float32 logits, row b the
        token after `token_ids[b]` in `sessions[b]`, whatever the others' lengths and rope deltas."""
        ids = torch.tensor(token_ids, device=self.config.device)[:, None]
        positions = torch.cat([step_positions(s.length, 1, s.rope_delta) for s in sessions], dim=1)
        hidden = self.kv.step(self.model, [s.kv for s in sessions], self.model.embed_tokens(ids),
                              positions.to(self.config.device))
        return self._logits(hidden)

    def _logits(self, last_hidden_state: Tensor) -> Tensor:
        """[B, V] float32 logits after each row's last position."""
        return self.lm_head(last_hidden_state[:, -1]).float()

    def _deepstack(
        self, prompt: ThinkerPrompt, masks: dict[str, Tensor], embeds: Tensor, skip: dict[str, int]
    ) -> tuple[Tensor | None, list[Tensor] | None]:
        """Visual positions [n] of the positions to run (`masks`) and, per deepstack layer, the features of all of
        them in prompt order (`skip`: each modality's given rows before those positions)."""
        visual = [(masks[m], e, skip[m]) for m, e in (("image", prompt.image), ("video", prompt.video))
                  if e is not None and bool(masks[m].any())]
        if not visual:
            return None, None
        visual_mask = torch.stack([mask for mask, _, _ in visual]).any(0)
        deepstack = []
        for layer in range(self.num_deepstack):
            joint = embeds.new_zeros(embeds.shape)
            for mask, emb, skipped in visual:
                joint[mask] = emb.deepstack[layer][skipped:].to(embeds.device, embeds.dtype)
            deepstack.append(joint[visual_mask])
        return visual_mask, deepstack

    def _validate(self, prompt: ThinkerPrompt) -> dict[str, Tensor]:
        """Check the prompt against its embeddings; return each modality's placeholder mask [L]."""
        ids = prompt.input_ids
        if ids.ndim != 1 or ids.numel() == 0 or ids.is_floating_point():
            raise InvalidInput(f"input_ids must be a non-empty 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise InvalidInput(
                f"token id {int(ids[bad][0])} is outside the Thinker vocabulary [0, {self.vocab_size})"
            )
        tc = self.thinker_config
        ids = ids.to(self.config.device)
        masks = {
            "audio": ids == tc.audio_token_id,
            "image": ids == tc.image_token_id,
            "video": ids == tc.video_token_id,
        }
        features = _mm_embeds(prompt)
        if not 0 <= prompt.embeds_from <= ids.numel():
            raise InvalidInput(f"embeds_from {prompt.embeds_from} is outside the prompt of {ids.numel()} tokens")
        for modality, mask in masks.items():
            given = features[modality]
            n_tokens, n_given = int(mask[prompt.embeds_from:].sum()), 0 if given is None else given.shape[0]
            if n_tokens != n_given:
                where = f" from token {prompt.embeds_from} on" if prompt.embeds_from else ""
                raise InvalidInput(
                    f"{modality}: the prompt has {n_tokens} placeholder tokens{where} but {n_given} embeddings "
                    "were given"
                )
            if given is not None and (given.ndim != 2 or given.shape[1] != self.hidden_size):
                raise InvalidInput(f"{modality} embeddings must be [N, {self.hidden_size}], got {tuple(given.shape)}")

        # The layout (lengths, grids) places every medium of the prompt, given embeddings or not.
        if bool(masks["audio"].any()):
            self._validate_audio(prompt, ids, int(masks["audio"].sum()))
        for modality, emb, grid in (
            ("image", prompt.image, prompt.image_grid_thw),
            ("video", prompt.video, prompt.video_grid_thw),
        ):
            if bool(masks[modality].any()):
                self._validate_vision(modality, emb, grid, int(masks[modality].sum()))
        if bool(masks["video"].any()):
            seconds = prompt.video_second_per_grid
            if seconds is None or seconds.numel() != prompt.video_grid_thw.shape[0]:
                raise InvalidInput("video_second_per_grid must give one value per video")
        return masks

    def _validate_audio(self, prompt: ThinkerPrompt, ids: Tensor, n_tokens: int) -> None:
        lengths = prompt.audio_feature_lengths
        if lengths is None:
            raise InvalidInput("audio_feature_lengths is required with audio (TM-RoPE positions depend on it)")
        n_audios = int((ids == self.thinker_config.audio_start_token_id).sum())
        if lengths.ndim != 1 or lengths.numel() != n_audios:
            raise InvalidInput(
                f"audio: the prompt has {n_audios} audios but {lengths.numel()} feature lengths were given"
            )
        expected = int(_get_feat_extract_output_lengths(lengths, self.thinker_config.audio_config.n_window).sum())
        if expected != n_tokens:
            raise InvalidInput(
                f"audio: feature lengths {lengths.tolist()} make {expected} embeddings, "
                f"but the prompt has {n_tokens} audio placeholders"
            )

    def _validate_vision(self, modality: str, emb: VisionEmbeddings | None, grid: Tensor | None,
                         n_tokens: int) -> None:
        if grid is None or grid.ndim != 2 or grid.shape[1] != 3:
            raise InvalidInput(f"{modality}: {modality}_grid_thw [num_{modality}s, 3] is required with its embeddings")
        grid_tokens = int(grid.prod(-1).sum()) // self.spatial_merge_size**2
        if grid_tokens != n_tokens:
            raise InvalidInput(
                f"{modality}: {modality}_grid_thw describes {grid_tokens} tokens, the prompt has {n_tokens}"
            )
        if emb is not None and (len(emb.deepstack) != self.num_deepstack
                                or any(d.shape != emb.embeds.shape for d in emb.deepstack)):
            raise InvalidInput(
                f"{modality}: expected {self.num_deepstack} deepstack tensors shaped like the embeddings "
                f"{tuple(emb.embeds.shape)}"
            )


def _mm_embeds(prompt: ThinkerPrompt) -> dict[str, Tensor | None]:
    return {
        "audio": prompt.audio_embeds,
        "image": None if prompt.image is None else prompt.image.embeds,
        "video": None if prompt.video is None else prompt.video.embeds,
    }

