"""Prompt prefixes a Thinker replica keeps between a session's calls, and how much of a new prompt they cover.

A session's next turn renders the whole conversation again. Its prompt starts with the tokens the replica already
holds KV for (the earlier turns, the answers it generated), so the replica keeps a finished request's KV under the
session's cache key (`KVPool.park`) and the next request with that key reuses the longest prefix it can prove equal
(DESIGN.md section 8: reuse KV only for an identical token prefix):

- token ids equal one by one; an earlier answer that the chat template re-tokenizes differently ends the prefix
  there, so the output stays the reference's;
- media by content, not by placeholder: every image or video, and every window of an audio, is a `Segment` of the
  prompt (its placeholders, and the markers around them) with a digest of the processor's tensors for it. Two
  audios of the same length have the same ids, so a segment is reused only if its digest is equal too, and never in
  part: a prefix ends before a segment it does not wholly cover. The caller then encodes only the media from the
  prefix's end on.

An audio's segments are the audio encoder's attention windows (`AudioWindow`: `n_window_infer` mel frames, whose
embeddings depend on those frames alone), so that a turn whose audio is still streaming in can be prefilled window
by window (`services.live_input`). The one input-wide dependency is the log-mel extractor's clamp at "maximum over
the whole audio minus 8": a louder moment later changes the features of earlier quiet windows, hence their
digests, and the prefix ends before the first changed window, which is computed again (a "redo").

    segments = media_segments(input_ids, processor_outputs, MarkerIds.of(tokenizer), AudioWindow())  # caller
    tokens, redone = reusable_tokens(parked, input_ids, segments, placeholders)                       # replica
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

from services.engines.digests import TENSOR_DIGESTS


@dataclass(frozen=True)
class Segment:
    """One medium of a prompt: its token range [start, end) (markers included) and a digest of its content."""

    start: int
    end: int
    digest: bytes


@dataclass(frozen=True)
class MarkerIds:
    """The token ids that bound and fill a medium's span in a prompt."""

    audio_start: int
    audio_end: int
    vision_start: int
    vision_end: int
    audio: int
    image: int
    video: int

    @classmethod
    def of(cls, tokenizer) -> "MarkerIds":
        names = ("<|audio_start|>", "<|audio_end|>", "<|vision_start|>", "<|vision_end|>", "<|audio_pad|>",
                 "<|image_pad|>", "<|video_pad|>")
        return cls(*tokenizer.convert_tokens_to_ids(list(names)))

    @classmethod
    def from_config(cls, thinker_config) -> "MarkerIds":
        c = thinker_config
        return cls(c.audio_start_token_id, c.audio_end_token_id, c.vision_start_token_id, c.vision_end_token_id,
                   c.audio_token_id, c.image_token_id, c.video_token_id)

    @property
    def placeholders(self) -> tuple[int, int, int]:
        return self.audio, self.image, self.video


@dataclass(frozen=True)
class AudioWindow:
    """The audio encoder's attention window (`n_window_infer` mel frames; the checkpoint's audio config, the same in
    the real and the tiny one) and its convolution chunk (2 * `n_window` frames)."""

    frames: int = 800
    n_window: int = 50

    @classmethod
    def of(cls, audio_config) -> "AudioWindow":
        return cls(audio_config.n_window_infer, audio_config.n_window)

    def tokens(self, frames: int) -> int:
        """Embeddings of an audio of `frames` mel frames."""
        return int(_get_feat_extract_output_lengths(torch.tensor(frames), self.n_window))


def media_segments(input_ids: Tensor, outputs: Mapping, markers: MarkerIds,
                   window: AudioWindow = AudioWindow()) -> tuple[Segment, ...]:
    """The prompt's media in order, each with a digest of the processor tensors it came from (`outputs`: the
    processor's; an audio window's features, an image's or video's patches and grid); an audio is one segment per
    window, its markers in the first and the last."""
    media = _MediaTensors(outputs)
    segments = []
    for start, end, kinds in media_spans(input_ids, markers):
        if kinds == ("audio",):
            segments += _audio_segments(start, end, media.audio_features(), window)
            continue
        digest = hashlib.sha256()
        for kind in kinds:
            media.add(kind, digest)
        segments.append(Segment(start, end, digest.digest()[:16]))
    return tuple(segments)


def media_bounds(input_ids: Tensor, outputs: Mapping, markers: MarkerIds,
                 window: AudioWindow = AudioWindow()) -> tuple[tuple[int, int], ...]:
    """The token ranges [start, end) of the prompt's `media_segments`, without their digests (which read every
    medium's tensors)."""
    lengths = outputs["feature_attention_mask"].sum(-1).tolist() if "feature_attention_mask" in outputs else []
    bounds, audios = [], 0
    for start, end, kinds in media_spans(input_ids, markers):
        bounds += _audio_bounds(start, end, lengths[audios], window) if kinds == ("audio",) else [(start, end)]
        audios += "audio" in kinds  # a video's sound track is one of the processor's audios too
    return tuple(bounds)


def _audio_segments(start: int, end: int, features: Tensor, window: AudioWindow) -> list[Segment]:
    segments = []
    for w, (a, b) in enumerate(_audio_bounds(start, end, features.shape[-1], window)):
        # Frame-major, as the extractor keeps a stream's features (`services.log_mel`): a window is then a view.
        frames = features[:, w * window.frames:(w + 1) * window.frames].T
        segments.append(Segment(a, b, hashlib.sha256(b"audio" + TENSOR_DIGESTS.digest(frames)).digest()[:16]))
    return segments


def _audio_bounds(start: int, end: int, frames: int, window: AudioWindow) -> list[tuple[int, int]]:
    """One audio's windows: tokens start+1 on are its embeddings, `window.tokens(window.frames)` per whole window;
    the first window holds the start marker, the last the end marker."""
    per_window = window.tokens(window.frames)
    bounds = []
    for w in range(-(-frames // window.frames)):
        a = start if w == 0 else start + 1 + w * per_window
        b = min(start + 1 + (w + 1) * per_window, end - 1)
        bounds.append((a, end if b == end - 1 else b))
    return bounds


def media_spans(input_ids: Tensor, markers: MarkerIds) -> list[tuple[int, int, tuple[str, ...]]]:
    """Each medium's token span [start, end) in prompt order, and the kinds of media it holds: ("image",),
    ("audio",), ("video",), or ("video", "audio") for a video with its audio track, whose audio markers nest
    inside the vision ones."""
    ids = input_ids.view(-1).tolist()
    spans, i = [], 0
    while i < len(ids):
        if ids[i] not in (markers.audio_start, markers.vision_start):
            i += 1
            continue
        close = markers.audio_end if ids[i] == markers.audio_start else markers.vision_end
        try:
            j = ids.index(close, i + 1) + 1
        except ValueError:  # unclosed: the prompt's end
            j = len(ids)
        inside = set(ids[i:j])
        kinds = tuple(k for k, pad in (("video", markers.video), ("image", markers.image), ("audio", markers.audio))
                      if pad in inside)
        spans.append((i, j, kinds))
        i = j
    return spans


class _MediaTensors:
    """The processor's tensors of each medium in prompt order, taken one medium at a time."""

    def __init__(self, outputs: Mapping):
        self.outputs = outputs
        self.taken = {"audio": 0, "image": 0, "video": 0}
        self.rows = {"image": 0, "video": 0}  # patch rows of the media taken

    def audio_features(self) -> Tensor:
        """The next audio's features [mel, frames]."""
        k = self.taken["audio"]
        self.taken["audio"] += 1
        length = int(self.outputs["feature_attention_mask"][k].sum())
        return self.outputs["input_features"][k, :, :length]

    def add(self, kind: str, digest) -> None:
        digest.update(kind.encode())
        if kind == "audio":
            digest.update(TENSOR_DIGESTS.digest(self.audio_features()))
            return
        k = self.taken[kind]
        self.taken[kind] += 1
        grid = self.outputs[f"{kind}_grid_thw"][k]
        pixels = self.outputs["pixel_values" if kind == "image" else "pixel_values_videos"]
        n = int(grid.prod())
        digest.update(TENSOR_DIGESTS.digest(grid))
        digest.update(TENSOR_DIGESTS.digest(pixels[self.rows[kind]:self.rows[kind] + n]))
        self.rows[kind] += n
        if kind == "video" and "video_second_per_grid" in self.outputs:
            digest.update(TENSOR_DIGESTS.digest(torch.as_tensor(self.outputs["video_second_per_grid"]).view(-1)[k]))


@dataclass(eq=False)
class ParkedPrefix:
    """What a replica keeps of a finished request for the next one with its cache key: its KV (`slot`, `ids` the
    tokens filled in it), the prompt's media, and the Talker's input states at the prompt's media placeholders."""

    slot: object  # KVSlot; its length is len(ids)
    ids: Tensor  # [length] the prompt and then the generated tokens fed back
    prompt_length: int  # where the prompt ends in `ids`
    segments: tuple[Segment, ...]
    mm_hidden: Tensor  # [N_mm, D] at the media placeholders of ids[:prompt_length]


def reusable_tokens(parked: ParkedPrefix, input_ids: Tensor, segments: Sequence[Segment],
                    placeholders: Sequence[int]) -> tuple[int, int]:
    """How many leading tokens of a new prompt (`input_ids`, its `segments`) the parked KV computes exactly: equal
    ids, every medium in them whole and with an equal digest, and at least the prompt's last token left to run (its
    logits are the first answer's); and whether (1) or not (0) that stopped at a segment the parked KV holds with
    other content (a redo). `placeholders`: the media placeholder ids, which only a prompt's media may hold."""
    tokens = _equal_ids(parked.ids, input_ids)
    # A placeholder id the model generated was fed as text: a prompt holding that id there wants an embedding.
    answer = parked.ids[parked.prompt_length:tokens]
    generated_placeholder = torch.isin(answer, torch.tensor(list(placeholders), device=answer.device)).nonzero()
    if generated_placeholder.numel():
        tokens = parked.prompt_length + int(generated_placeholder[0])
    known = {(s.start, s.end): s.digest for s in parked.segments}
    for segment in segments:
        if segment.start >= tokens:
            break
        digest = known.get((segment.start, segment.end))
        if segment.end > tokens or digest != segment.digest:
            return segment.start, int(digest is not None and digest != segment.digest)
    return tokens, 0


def expected_reuse(held_ids: Tensor, input_ids: Tensor, bounds: Sequence[tuple[int, int]]) -> int:
    """Where `reusable_tokens` will end for a replica that holds the prompt `held_ids` (a turn's live prefill),
    if the new prompt (`input_ids`, its `media_bounds`) has its media unchanged: where the media the replica asks
    for start. Known before the digests are, so their encoding can start beside them (`PromptMedia.of`)."""
    tokens = _equal_ids(held_ids, input_ids)
    for start, end in bounds:
        if start >= tokens:
            break
        if end > tokens:
            return start
    return tokens


def _equal_ids(held: Tensor, input_ids: Tensor) -> int:
    """The leading ids of `input_ids` equal to `held`'s, leaving at least its last one to run."""
    ids = input_ids.view(-1).to(held.device)
    n = min(held.numel(), ids.numel() - 1)
    differ = (held[:n] != ids[:n]).nonzero()
    return int(differ[0]) if differ.numel() else n
