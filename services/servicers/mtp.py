"""MTP.Predict: one stream per Talker replica carries the frames of all its requests -> `MTPStage.predict`.

Each frame is answered as soon as its step has run, in whatever order: frames of every open stream that are ready
together share one engine step (`LocalMTP`'s batcher), and the Talker matches answers to frames by key.
The stream has no per-frame error: a bad frame ends it with a status, failing the caller's frames in flight.
Each frame names its request and carries its trace context: the stream itself belongs to no turn.
"""

from __future__ import annotations

import asyncio
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


MAX_IN_FLIGHT = 256  # frames of one stream waiting for their steps: bounded by the Talker replica's open requests
_END = object()


class MTPServicer(mtp_pb2_grpc.MTPServicer):
    service = "MTP"
    add_to_server = staticmethod(mtp_pb2_grpc.add_MTPServicer_to_server)

    def __init__(self, stage: MTPStage):
        self.stage = stage

    async def Predict(self, requests: AsyncIterator[PredictRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[PredictResponse]:
        async with translate_errors(context, "mtp"):
            answers: asyncio.Queue = asyncio.Queue()  # responses, errors, then _END
            reader = asyncio.create_task(self._read(requests, answers))
            try:
                while (item := await answers.get()) is not _END:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[PredictRequest], answers: asyncio.Queue) -> None:
        """Start each frame's answer as it arrives, so the frames of a stream's requests share steps; then _END
        once every answer is out."""
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        frames: set[asyncio.Task] = set()
        try:
            async for msg in requests:
                hidden = from_proto(msg.hidden)
                if hidden.ndim != 1:
                    raise InvalidInput(f"MTP frame {msg.request_id}/{msg.frame}: hidden must be [talker_hidden], "
                                       f"got shape {list(hidden.shape)}")
                await slots.acquire()
                frames.add(task := asyncio.create_task(self._answer(msg, hidden, answers, slots)))
                task.add_done_callback(frames.discard)
            await asyncio.gather(*frames)
            answers.put_nowait(_END)
        except Exception as e:
            answers.put_nowait(e)
        finally:
            for task in frames:
                task.cancel()

    async def _answer(self, msg: PredictRequest, hidden, answers: asyncio.Queue, slots: asyncio.Semaphore) -> None:
        try:
            REQUEST_ID.set(msg.request_id)  # this frame's task only
            with tracing.current(ctx=tracing.extract(msg.trace_context) or context_api.Context()):
                result = await self.stage.predict(hidden[None], torch.tensor([msg.c0]), msg.greedy,
                                                  msg.seed if msg.HasField("seed") else None)
            answers.put_nowait(PredictResponse(request_id=msg.request_id, frame=msg.frame,
                                               codes=CodecFrame(codes=result.codes[0].tolist()),
                                               embed_sum=to_proto(result.embed_sum[0])))
        except Exception as e:
            answers.put_nowait(e)
        finally:
            slots.release()
