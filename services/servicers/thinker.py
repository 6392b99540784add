"""Thinker.Think: a prompt in pieces -> `ThinkerStage.generate` -> mm_hidden in pieces, tokens, end; then resume.

`resume` re-prefills: the stage interface streams one generation and frees its KV cache when it ends, so a
continuation runs `generate` again on the prompt + every generated token (the stop token included) + the resume
tokens, with the same multimodal embeddings (kept for the request's life). Same positions and the same answer up
to float rounding, at the cost of one prefill per resume; reusing the cache would need a `resume` on the stage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace

import grpc
import torch
from torch import Tensor

from services.engines.thinker import DEFAULT_MAX_NEW_TOKENS, ThinkerPrompt
from services.engines.vision_encoder import VisionEmbeddings
from services.errors import InvalidInput
from services.servicers import REQUEST_ID, read_start, read_tensors, required, sampling_from_proto
from services.servicers.status import translate_errors
from services.stages import ThinkerStage
from services.wire.gen.omni.v1 import thinker_pb2_grpc
from services.wire.gen.omni.v1.common_pb2 import FinishReason, Tokens
from services.wire.gen.omni.v1.thinker_pb2 import ThinkEnd, ThinkRequest, ThinkResponse
from services.wire.tensors import to_pieces

PROMPT_TENSORS = ("input_ids", "audio_embeds", "audio_feature_lengths", "image_embeds", "image_deepstack",
                  "image_grid_thw", "video_embeds", "video_deepstack", "video_grid_thw", "video_second_per_grid")


def prompt_tensors(prompt: ThinkerPrompt) -> dict[str, Tensor]:
    """The wire tensors of a `ThinkerPrompt` (its flag `use_audio_in_video` travels in `ThinkStart`)."""
    out = {"input_ids": prompt.input_ids, "audio_embeds": prompt.audio_embeds,
           "audio_feature_lengths": prompt.audio_feature_lengths, "image_grid_thw": prompt.image_grid_thw,
           "video_grid_thw": prompt.video_grid_thw, "video_second_per_grid": prompt.video_second_per_grid}
    for kind, emb in (("image", prompt.image), ("video", prompt.video)):
        if emb is not None:
            out[f"{kind}_embeds"], out[f"{kind}_deepstack"] = emb.embeds, torch.stack(emb.deepstack)
    return {name: t for name, t in out.items() if t is not None}


def prompt_from_tensors(tensors: dict[str, Tensor], use_audio_in_video: bool) -> ThinkerPrompt:
    (input_ids,) = required(tensors, "input_ids")
    prompt = ThinkerPrompt(input_ids=input_ids, audio_embeds=tensors.get("audio_embeds"),
                           audio_feature_lengths=tensors.get("audio_feature_lengths"),
                           image_grid_thw=tensors.get("image_grid_thw"), video_grid_thw=tensors.get("video_grid_thw"),
                           video_second_per_grid=tensors.get("video_second_per_grid"),
                           use_audio_in_video=use_audio_in_video)
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
            tensors, end = await read_tensors(requests, "prompt", PROMPT_TENSORS, until=("prompt_end",))
            if end is None:
                raise InvalidInput("Think: the stream ended before prompt_end")
            prompt = prompt_from_tensors(tensors, start.use_audio_in_video)
            sampling = sampling_from_proto(start.sampling)
            max_new_tokens = start.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
            want_mm_hidden = start.return_mm_hidden
            while True:
                generated: list[int] = []
                async with aclosing(self.stage.generate(prompt, sampling, max_new_tokens, self.stop_ids)) as tokens:
                    async for item in tokens:
                        if item.mm_hidden is not None and want_mm_hidden:
                            for piece in to_pieces("mm_hidden", item.mm_hidden):
                                yield ThinkResponse(mm_hidden=piece)
                        generated.append(item.token_id)
                        yield ThinkResponse(tokens=Tokens(token_ids=[item.token_id]))
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
