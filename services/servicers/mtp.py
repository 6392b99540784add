"""MTP.Predict: one stream per Talker replica carries the frames of all its requests -> `MTPStage.predict`.

A message's frames (those the Talker's requests queued together: `RemoteMTP`) enter the stage's batcher together,
so they share one engine step with each other and with the frames of every other open stream that are ready
(`LocalMTP`). Each message is answered as soon as its frames have run, in whatever order; the Talker matches
answers to frames by key. The stream has no per-frame error: a bad frame ends it with a status, failing the
caller's frames in flight. Each frame names its request and carries its trace context: the stream itself belongs
to no turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import torch

from opentelemetry import context as context_api

from services import tracing
from services.engines.mtp import MTPResult
from services.errors import InvalidInput
from services.servicers import REQUEST_ID
from services.servicers.status import translate_errors
from services.stages import MTPStage
from services.wire.gen.omni.v1 import mtp_pb2_grpc
from services.wire.gen.omni.v1.common_pb2 import CodecFrame
from services.wire.gen.omni.v1.mtp_pb2 import MTPAnswer, MTPFrame, PredictRequest, PredictResponse
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
        """Start each message's answer as it arrives, so that its frames, and those of other messages, share steps;
        then _END once every answer is out."""
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        messages: set[asyncio.Task] = set()
        try:
            async for msg in requests:
                if not 0 < len(msg.frames) <= MAX_IN_FLIGHT:
                    raise InvalidInput(f"MTP: a message carries 1 to {MAX_IN_FLIGHT} frames, got {len(msg.frames)}")
                hidden = [_hidden(frame) for frame in msg.frames]
                for _ in msg.frames:
                    await slots.acquire()
                messages.add(task := asyncio.create_task(self._answer(msg.frames, hidden, answers, slots)))
                task.add_done_callback(messages.discard)
            await asyncio.gather(*messages)
            answers.put_nowait(_END)
        except Exception as e:
            answers.put_nowait(e)
        finally:
            for task in messages:
                task.cancel()

    async def _answer(self, frames: Sequence[MTPFrame], hidden: list[torch.Tensor], answers: asyncio.Queue,
                      slots: asyncio.Semaphore) -> None:
        try:
            results = await asyncio.gather(*(self._predict(f, h) for f, h in zip(frames, hidden)))
            answers.put_nowait(PredictResponse(answers=[
                MTPAnswer(request_id=f.request_id, frame=f.frame, codes=CodecFrame(codes=r.codes[0].tolist()),
                          embed_sum=to_proto(r.embed_sum[0])) for f, r in zip(frames, results)]))
        except Exception as e:
            answers.put_nowait(e)
        finally:
            for _ in frames:
                slots.release()

    async def _predict(self, frame: MTPFrame, hidden: torch.Tensor) -> MTPResult:
        """One frame, in its own task: its request id and trace context are its own."""
        REQUEST_ID.set(frame.request_id)
        with tracing.current(ctx=tracing.extract(frame.trace_context) or context_api.Context()):
            return await self.stage.predict(hidden[None], torch.tensor([frame.c0]), frame.greedy,
                                            frame.seed if frame.HasField("seed") else None)


def _hidden(frame: MTPFrame) -> torch.Tensor:
    hidden = from_proto(frame.hidden)
    if hidden.ndim != 1:
        raise InvalidInput(f"MTP frame {frame.request_id}/{frame.frame}: hidden must be [talker_hidden], got shape "
                           f"{list(hidden.shape)}")
    return hidden
