"""MTP.Predict: one stream per Talker replica carries the frames of all its requests -> `MTPStage.predict`.

Frames are answered one at a time in arrival order. MTP keeps no state across frames, so batching the frames that
wait on every open stream into one `predict` call is the next step when it pays (many Talker requests per GPU).
The stream has no per-frame error: a bad frame ends it with a status, failing the caller's frames in flight.
Each frame names its request and carries its trace context: the stream itself belongs to no turn.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import torch

from opentelemetry import context as context_api

from services import tracing
from services.errors import InvalidInput
from services.servicers import REQUEST_ID
from services.servicers.status import translate_errors
from services.stages import MTPStage
from services.wire.gen.omni.v1 import mtp_pb2_grpc
from services.wire.gen.omni.v1.common_pb2 import CodecFrame
from services.wire.gen.omni.v1.mtp_pb2 import PredictRequest, PredictResponse
from services.wire.tensors import from_proto, to_proto


class MTPServicer(mtp_pb2_grpc.MTPServicer):
    service = "MTP"
    add_to_server = staticmethod(mtp_pb2_grpc.add_MTPServicer_to_server)

    def __init__(self, stage: MTPStage):
        self.stage = stage

    async def Predict(self, requests: AsyncIterator[PredictRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[PredictResponse]:
        async with translate_errors(context, "mtp"):
            async for msg in requests:
                hidden = from_proto(msg.hidden)
                if hidden.ndim != 1:
                    raise InvalidInput(f"MTP frame {msg.request_id}/{msg.frame}: hidden must be [talker_hidden], "
                                       f"got shape {list(hidden.shape)}")
                REQUEST_ID.set(msg.request_id)
                with tracing.current(ctx=tracing.extract(msg.trace_context) or context_api.Context()):
                    result = await self.stage.predict(hidden[None], torch.tensor([msg.c0]), msg.greedy,
                                                      msg.seed if msg.HasField("seed") else None)
                yield PredictResponse(request_id=msg.request_id, frame=msg.frame,
                                      codes=CodecFrame(codes=result.codes[0].tolist()),
                                      embed_sum=to_proto(result.embed_sum[0]))
