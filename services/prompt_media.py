"""A turn's Thinker prompt, with its media encoded only where the Thinker needs them.

The processor's outputs give the prompt's layout (ids, audio lengths, image and video grids), which fixes every
position; the encoders' embeddings are needed only for the media past the prefix the Thinker replica already holds
for the session (`services.engines.prefix`). So the conductor hands the Thinker stage the layout and `embed`, which
the stage calls with that prefix's length: the history's media are encoded again only when the replica lost them,
and an audio from the window the prefix ends at (its windows are independent: `services.engines.prefix`).

    media = await PromptMedia.of(stages, processor_outputs, cache_key="alice/s1", mark=turn.mark)
    tokens = stages.thinker.generate(media.prompt, sampling, max_new_tokens, stop_ids, embed=media.embedder)

The media's digests (the prompt's segments, which prove a prefix equal) read all of their tensors: at the end of a
long audio, milliseconds per minute of it. They are taken on a worker thread, off the event loop; and given the ids
the replica holds for the turn (its live prefill's, `held`), the media past where its reuse will end are encoded
beside them, before the replica asks (`services.engines.prefix.expected_reuse`). Where it asks for others, those
are encoded then, and the early ones were only wasted work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

import torch
from torch import Tensor

from services.engines.kv_pages import KEEP_SESSION
from services.engines.prefix import MarkerIds, expected_reuse, media_bounds, media_segments, media_spans
from services.engines.thinker import ThinkerPrompt


class PromptMedia:
    def __init__(self, stages, outputs: Mapping, *, cache_key: str = "", keep: str = KEEP_SESSION,
                 mark: Callable[[str, float], None] = lambda key, since: None):
        """`stages`: the turn's `Stages` (its audio and vision encoders, its processor's marker tokens);
        `outputs`: the processor's; `cache_key`, `keep`: the `ThinkerPrompt`'s; `mark(key, since)` records an
        encoder's time to first output. The prompt's segments are `of`'s to fill in."""
        self.stages, self.outputs, self.mark = stages, outputs, mark
        ids = outputs["input_ids"][0]
        self.markers = MarkerIds.of(stages.processor.tokenizer)
        self.window = stages.audio_window
        # Each medium's span, by kind in prompt order (an audio's own, or its video's for a sound track).
        self._spans: dict[str, list[tuple[int, int, bool]]] = {"audio": [], "image": [], "video": []}
        for start, end, kinds in media_spans(ids, self.markers):
            for kind in kinds:
                self._spans[kind].append((start, end, kinds == ("audio",)))
        self.has_media = any(self._spans.values())
        self.prompt = ThinkerPrompt(
            input_ids=ids, use_audio_in_video=bool(outputs.get("use_audio_in_video")),
            audio_feature_lengths=outputs["feature_attention_mask"].sum(-1) if "input_features" in outputs else None,
            image_grid_thw=outputs.get("image_grid_thw"), video_grid_thw=outputs.get("video_grid_thw"),
            video_second_per_grid=(torch.as_tensor(outputs["video_second_per_grid"])
                                   if "video_second_per_grid" in outputs else None),
            cache_key=cache_key, keep=keep, embeds_from=ids.numel() if self.has_media else 0)
        # By `from_token`: a tool call's second generation may ask again; an early start is one not yet asked for.
        self._embedded: dict[int, asyncio.Future] = {}

    @classmethod
    async def of(cls, stages, outputs: Mapping, *, held: Tensor | None = None, **kwargs) -> "PromptMedia":
        """The turn's prompt with its segments. `held`: the prompt ids the Thinker replica holds for its cache key
        (the turn's last live prefill), whose reuse decides which media to start encoding now."""
        media = cls(stages, outputs, **kwargs)
        if not media.has_media:
            return media
        ids = media.prompt.input_ids
        if held is not None:
            media._start(expected_reuse(held, ids, media_bounds(ids, outputs, media.markers, media.window)))
        media.prompt.segments = await asyncio.to_thread(media_segments, ids, outputs, media.markers, media.window)
        return media

    @property
    def embedder(self) -> Callable[[int], Awaitable[ThinkerPrompt]] | None:
        """`embed`, or None where the prompt has no media: then it is whole as it is, and a Thinker replica need not
        ask for embeddings (served, a round trip to the gateway before the prefill)."""
        return self.embed if self.has_media else None

    async def embed(self, from_token: int) -> ThinkerPrompt:
        """The prompt (as it is now: a tool call appends to its ids) with the embeddings of its media from token
        `from_token` on (a media boundary)."""
        # Shielded: a caller cancelled (a stage call run again on another replica) leaves it for the next.
        fields = await asyncio.shield(self._start(from_token))
        return replace(self.prompt, embeds_from=from_token, **fields)

    def _start(self, from_token: int) -> asyncio.Future:
        """The encoding of the media from `from_token` on: started now, unless it is under way or done."""
        task = self._embedded.get(from_token)
        if task is None or task.cancelled() or (task.done() and task.exception() is not None):
            task = self._embedded[from_token] = asyncio.ensure_future(self._encode(from_token))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # one nobody awaits logs nothing
        return task

    def _items(self, kind: str, from_token: int) -> list[int]:
        return [k for k, (start, _, _) in enumerate(self._spans[kind]) if start >= from_token]

    def _audio_frames(self, from_token: int) -> list[tuple[int, int]]:
        """(audio, first mel frame) of each audio with embeddings from `from_token` on: a whole audio after it, or
        the windows of the audio it falls in (at a window's first token)."""
        out = []
        for k, (start, end, windowed) in enumerate(self._spans["audio"]):
            if start >= from_token:
                out.append((k, 0))
            elif from_token < end and windowed:
                window = (from_token - start - 1) // self.window.tokens(self.window.frames)
                out.append((k, window * self.window.frames))
        return out

    async def _encode(self, from_token: int) -> dict:
        """The `ThinkerPrompt` embedding fields of the media from `from_token` on."""
        fields, po = {}, self.outputs

        async def audio(items: list[tuple[int, int]]):
            t = time.perf_counter()
            fields["audio_embeds"] = await self.stages.audio.encode(*_audio_batch(po, items))
            self.mark("audio_encoder_ttft", t)

        async def vision(kind: str, items: list[int]):
            t = time.perf_counter()
            pixels, grid = po["pixel_values" if kind == "image" else "pixel_values_videos"], po[f"{kind}_grid_thw"]
            fields[kind] = await self.stages.vision.encode(_rows(pixels, grid, items), grid[items])
            self.mark("vision_encoder_ttft", t)

        async with asyncio.TaskGroup() as tg:
            if items := self._audio_frames(from_token):
                tg.create_task(audio(items))
            for kind in ("image", "video"):
                if items := self._items(kind, from_token):
                    tg.create_task(vision(kind, items))
        return fields


def _audio_batch(outputs: Mapping, items: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """Features [A, mel, T] and mask [A, T] of the audios `items` from their first frames on."""
    features, mask = outputs["input_features"], outputs["feature_attention_mask"]
    if all(first == 0 for _, first in items):
        index = [k for k, _ in items]
        return features[index], mask[index]
    lengths = [int(mask[k].sum()) - first for k, first in items]
    batch = features.new_zeros(len(items), features.shape[1], max(lengths))
    batch_mask = mask.new_zeros(len(items), max(lengths))
    for row, ((k, first), length) in enumerate(zip(items, lengths)):
        batch[row, :, :length] = features[k, :, first:first + length]
        batch_mask[row, :length] = 1
    return batch, batch_mask


def _rows(pixels: Tensor, grid: Tensor, items: list[int]) -> Tensor:
    """The patch rows of the media `items` (each medium's rows: the product of its grid)."""
    if len(items) == grid.shape[0]:
        return pixels
    ends = grid.prod(-1).cumsum(0).tolist()
    return torch.cat([pixels[(ends[k - 1] if k else 0):ends[k]] for k in items])
