"""Thinker.Think: a prompt in pieces -> `ThinkerStage.generate` -> mm_hidden in pieces, tokens, end; then resume.

`resume` runs `generate` again on the prompt + every generated token (the stop token included) + the resume tokens.
With a `cache_key` the replica kept the first generation's KV under it, so only the resume tokens prefill; without
one, the whole prompt prefills again, with the same multimodal embeddings (kept for the request's life).

With `defer_media` the caller sends the prompt's layout first and the media's embeddings only when the stage asks
for them (`prefix`: the tokens it holds for the cache key), so media that the replica holds are not encoded again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

import grpc
import torch
from torch import Tensor

from services.engines.prefix import Segment
from services.engines.thinker import DEFAULT_MAX_NEW_TOKENS, ThinkerPrompt
from services.engines.vision_encoder import VisionEmbeddings
from services.errors import InvalidInput
from services.servicers import REQUEST_ID, keep_from_proto, read_start, read_tensors, required, sampling_from_proto
from services.servicers.status import translate_errors
from services.stages import ThinkerStage
from services.wire.gen.omni.v1 import thinker_pb2_grpc
from services.wire.gen.omni.v1.common_pb2 import FinishReason, Tokens
from services.wire.gen.omni.v1.thinker_pb2 import (
    MediaSegment,
    Prefix,
    ThinkEnd,
    ThinkRequest,
    ThinkResponse,
    ThinkStart,
)
from services.wire.tensors import to_pieces

PROMPT_TENSORS = ("input_ids", "audio_embeds", "audio_feature_lengths", "image_embeds", "image_deepstack",
                  "image_grid_thw", "video_embeds", "video_deepstack", "video_grid_thw", "video_second_per_grid")
EMBED_TENSORS = ("audio_embeds", "image_embeds", "image_deepstack", "video_embeds", "video_deepstack")
LAYOUT_TENSORS = tuple(name for name in PROMPT_TENSORS if name not in EMBED_TENSORS)
_DONE = object()


def prompt_tensors(prompt: ThinkerPrompt) -> dict[str, Tensor]:
    """The wire tensors of a `ThinkerPrompt` (its flag `use_audio_in_video` travels in `ThinkStart`)."""
    out = {"input_ids": prompt.input_ids, "audio_embeds": prompt.audio_embeds,
           "audio_feature_lengths": prompt.audio_feature_lengths, "image_grid_thw": prompt.image_grid_thw,
           "video_grid_thw": prompt.video_grid_thw, "video_second_per_grid": prompt.video_second_per_grid}
    for kind, emb in (("image", prompt.image), ("video", prompt.video)):
        if emb is not None:
            out[f"{kind}_embeds"], out[f"{kind}_deepstack"] = emb.embeds, torch.stack(emb.deepstack)
    return {name: t for name, t in out.items() if t is not None}


def segments_to_proto(prompt: ThinkerPrompt) -> list[MediaSegment]:
    return [MediaSegment(start=s.start, end=s.end, digest=s.digest) for s in prompt.segments]


def prompt_from_tensors(tensors: dict[str, Tensor], start: ThinkStart, embeds_from: int = 0) -> ThinkerPrompt:
    (input_ids,) = required(tensors, "input_ids")
    segments = tuple(Segment(s.start, s.end, s.digest) for s in start.segments)
    prompt = ThinkerPrompt(input_ids=input_ids, audio_embeds=tensors.get("audio_embeds"),
                           audio_feature_lengths=tensors.get("audio_feature_lengths"),
                           image_grid_thw=tensors.get("image_grid_thw"), video_grid_thw=tensors.get("video_grid_thw"),
                           video_second_per_grid=tensors.get("video_second_per_grid"),
                           use_audio_in_video=start.use_audio_in_video, cache_key=start.cache_key,
                           segments=segments, embeds_from=embeds_from, keep=keep_from_proto(start.keep),
                           hidden_from=start.mm_hidden_from)
    for kind in ("image", "video"):
        if f"{kind}_embeds" in tensors or f"{kind}_deepstack" in tensors:
            embeds, deepstack = required(tensors, f"{kind}_embeds", f"{kind}_deepstack")
            setattr(prompt, kind, VisionEmbeddings(embeds=embeds, deepstack=list(deepstack)))
    return prompt


class ThinkerServicer(thinker_pb2_grpc.ThinkerServicer):
    service = "Thinker"
    add_to_server = staticmethod(thinker_pb2_grpc.add_ThinkerServicer_to_server)

    def __init__(self, stage: ThinkerStage, stop_ids: frozenset[int]):
        self.stage = stage
        self.stop_ids = stop_ids  # the checkpoint's (the wire does not carry them)

    async def Think(self, requests: AsyncIterator[ThinkRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[ThinkResponse]:
        async with translate_errors(context, "thinker"):
            start = await read_start(requests, "Think")
            REQUEST_ID.set(start.request_id)
            allowed = LAYOUT_TENSORS if start.defer_media else PROMPT_TENSORS
            tensors, end = await read_tensors(requests, "prompt", allowed, until=("prompt_end",))
            if end is None:
                raise InvalidInput("Think: the stream ended before prompt_end")
            prompt = prompt_from_tensors(tensors, start)
            if start.defer_media:  # the layout alone: no embeddings yet
                prompt = replace(prompt, embeds_from=prompt.input_ids.numel())
            sampling = sampling_from_proto(start.sampling)
            max_new_tokens = 0 if start.prefill_only else start.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
            want_mm_hidden = start.return_mm_hidden
            responses: asyncio.Queue = asyncio.Queue()

            async def embed(from_token: int) -> ThinkerPrompt:
                """Ask the caller for the media's embeddings from `from_token` on."""
                await responses.put(ThinkResponse(prefix=Prefix(reused_tokens=from_token)))
                media, end = await read_tensors(requests, "prompt", EMBED_TENSORS, until=("prompt_end",))
                if end is None:
                    raise InvalidInput("Think: the stream ended before the media's prompt_end")
                return prompt_from_tensors({**tensors, **media, "input_ids": prompt.input_ids}, start, from_token)

            while True:
                generated: list[int] = []
                tokens = self.stage.generate(prompt, sampling, max_new_tokens, self.stop_ids,
                                             embed if start.defer_media else None)
                pump = asyncio.create_task(_pump(tokens, responses))
                try:
                    while (item := await responses.get()) is not _DONE:
                        if isinstance(item, BaseException):
                            raise item
                        if isinstance(item, ThinkResponse):  # the stage asks for the media's embeddings
                            yield item
                            continue
                        if item.mm_hidden is not None and want_mm_hidden:
                            yield ThinkResponse(mm_hidden_from=item.mm_from)
                            for piece in to_pieces("mm_hidden", item.mm_hidden):
                                yield ThinkResponse(mm_hidden=piece)
                        if item.token_id is None:  # prefill only: no token
                            continue
                        generated.append(item.token_id)
                        yield ThinkResponse(tokens=Tokens(token_ids=[item.token_id]))
                finally:
                    pump.cancel()
                stopped = bool(generated) and generated[-1] in self.stop_ids
                yield ThinkResponse(end=ThinkEnd(
                    finish_reason=FinishReason.FINISH_REASON_STOP if stopped else FinishReason.FINISH_REASON_LENGTH,
                    prompt_tokens=len(prompt.input_ids), generated_tokens=len(generated)))
                msg = await anext(requests, None)
                if msg is None:  # the caller half-closed: the request is done
                    return
                if msg.WhichOneof("kind") != "resume":
                    raise InvalidInput(f"Think: after end only resume is accepted, got {msg.WhichOneof('kind')}")
                appended = torch.tensor([*generated, *msg.resume.token_ids], dtype=prompt.input_ids.dtype)
                prompt = replace(prompt, input_ids=torch.cat((prompt.input_ids, appended)))
                max_new_tokens = msg.resume.max_new_tokens or start.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
                want_mm_hidden = False  # sent once, after the first prefill


async def _pump(tokens: AsyncIterator, out: asyncio.Queue) -> None:
    """The stage's tokens into `out` (beside the `prefix` asks of its `embed`), then _DONE or the error."""
    try:
        async with aclosing(tokens):
            async for item in tokens:
                await out.put(item)
        await out.put(_DONE)
    except Exception as e:
        await out.put(e)
