"""Code2Wav.Decode: frames as the Talker makes them -> `Code2WavStage.decode` -> samples as soon as they are final."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from services.engines.code2wav import SAMPLE_RATE
from services.errors import InvalidInput
from services.servicers import REQUEST_ID, read_start
from services.servicers.status import translate_errors
from services.stages import Code2WavStage, Codes
from services.wire.gen.omni.v1 import code2wav_pb2_grpc
from services.wire.gen.omni.v1.code2wav_pb2 import DecodeRequest, DecodeResponse
from services.wire.tensors import to_proto


class Code2WavServicer(code2wav_pb2_grpc.Code2WavServicer):
    service = "Code2Wav"
    add_to_server = staticmethod(code2wav_pb2_grpc.add_Code2WavServicer_to_server)

    def __init__(self, stage: Code2WavStage, sample_rate: int = SAMPLE_RATE):
        self.stage = stage
        self.sample_rate = sample_rate

    async def Decode(self, requests: AsyncIterator[DecodeRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[DecodeResponse]:
        async with translate_errors(context, "code2wav"):
            REQUEST_ID.set((await read_start(requests, "Decode")).request_id)
            frames = _Frames(requests)
            seq = 0
            async with aclosing(self.stage.decode(frames)) as samples:
                async for chunk in samples:
                    yield DecodeResponse(seq=seq, samples=to_proto(chunk.float()), sample_rate=self.sample_rate,
                                         frames=frames.taken)
                    seq += 1


class _Frames:
    """The stream's frames (`Codes`) until the caller half-closes, counting those the stage has taken: the samples
    it yields are final up to them."""

    def __init__(self, requests: AsyncIterator[DecodeRequest]):
        self.requests = requests
        self.taken = 0

    async def __aiter__(self) -> AsyncIterator[Codes]:
        async for msg in self.requests:
            if msg.WhichOneof("kind") != "frames":
                raise InvalidInput(f"Decode: expected frames, got {msg.WhichOneof('kind') or 'an empty message'}")
            for frame in msg.frames.frames:
                self.taken += 1
                yield tuple(frame.codes)
