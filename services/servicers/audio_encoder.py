"""AudioEncoder.EncodeAudio: features in pieces -> `AudioEncoderStage.encode` -> embeddings in pieces."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.servicers import REQUEST_ID, read_start, read_tensors, required
from services.servicers.status import translate_errors
from services.stages import AudioEncoderStage
from services.wire.gen.omni.v1 import audio_encoder_pb2_grpc
from services.wire.gen.omni.v1.audio_encoder_pb2 import EncodeAudioRequest, EncodeAudioResponse
from services.wire.tensors import to_pieces

INPUTS = ("input_features", "feature_attention_mask")


class AudioEncoderServicer(audio_encoder_pb2_grpc.AudioEncoderServicer):
    service = "AudioEncoder"
    add_to_server = staticmethod(audio_encoder_pb2_grpc.add_AudioEncoderServicer_to_server)

    def __init__(self, stage: AudioEncoderStage):
        self.stage = stage

    async def EncodeAudio(self, requests: AsyncIterator[EncodeAudioRequest],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[EncodeAudioResponse]:
        async with translate_errors(context, "audio encoder"):
            REQUEST_ID.set((await read_start(requests, "EncodeAudio")).request_id)
            tensors, _ = await read_tensors(requests, "piece", INPUTS)
            embeds = await self.stage.encode(*required(tensors, *INPUTS))
            for piece in to_pieces("audio_embeds", embeds):
                yield EncodeAudioResponse(piece=piece)
