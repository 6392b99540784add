"""VisionEncoder.EncodeVision: patches in pieces -> `VisionEncoderStage.encode` -> embeddings in pieces."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import torch
from torch import Tensor

from services.engines.vision_encoder import VisionEmbeddings
from services.servicers import REQUEST_ID, read_start, read_tensors, required
from services.servicers.status import translate_errors
from services.stages import VisionEncoderStage
from services.wire.gen.omni.v1 import vision_encoder_pb2_grpc
from services.wire.gen.omni.v1.vision_encoder_pb2 import EncodeVisionRequest, EncodeVisionResponse
from services.wire.tensors import to_pieces

INPUTS = ("pixel_values", "grid_thw")


def embeddings_tensors(emb: VisionEmbeddings) -> dict[str, Tensor]:
    """The wire tensors of `VisionEmbeddings`: deepstack layers stacked into one tensor."""
    return {"embeds": emb.embeds, "deepstack": torch.stack(emb.deepstack)}


class VisionEncoderServicer(vision_encoder_pb2_grpc.VisionEncoderServicer):
    service = "VisionEncoder"
    add_to_server = staticmethod(vision_encoder_pb2_grpc.add_VisionEncoderServicer_to_server)

    def __init__(self, stage: VisionEncoderStage):
        self.stage = stage

    async def EncodeVision(self, requests: AsyncIterator[EncodeVisionRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[EncodeVisionResponse]:
        async with translate_errors(context, "vision encoder"):
            REQUEST_ID.set((await read_start(requests, "EncodeVision")).request_id)
            tensors, _ = await read_tensors(requests, "piece", INPUTS)
            emb = await self.stage.encode(*required(tensors, *INPUTS))
            for name, tensor in embeddings_tensors(emb).items():
                for piece in to_pieces(name, tensor):
                    yield EncodeVisionResponse(piece=piece)
