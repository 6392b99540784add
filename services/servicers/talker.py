"""Talker.Speak: a prompt in pieces, then released text tokens -> `TalkerStage.speak` -> one frame per message,
then `end`.

The stage calls MTP itself every frame: in a deployment its `mtp` is a `services.remote.RemoteMTP` holding one
stream to the MTP stage for all of this replica's requests.

The speech may stop before the text does (`max_frames`). The client is then still writing text, and a call that
ended under a write reads as INTERNAL on the client's side (grpc/grpc#36066), losing the frames it had not read. So
after its last frame the servicer says `end` and reads on until the client stops (at most END_GRACE_S). A failed call
does the same: its `end` carries the status, which also ends the call after that wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress

import grpc
from torch import Tensor

from services.engines.talker import DEFAULT_MAX_NEW_TOKENS, TalkerPrompt, default_talker_sampling
from services.errors import InvalidInput
from services.servicers import REQUEST_ID, keep_from_proto, read_start, read_tensors, required, sampling_from_proto
from services.servicers.status import reported
from services.stages import TalkerStage
from services.wire.gen.omni.v1 import talker_pb2_grpc
from services.wire.gen.omni.v1.common_pb2 import CodecFrame
from services.wire.gen.omni.v1.talker_pb2 import SpeakEnd, SpeakRequest, SpeakResponse

END_GRACE_S = 5.0  # how long a call waits after `end` for its client to stop
PROMPT_TENSORS = ("input_ids", "mm_hidden", "audio_feature_lengths", "image_grid_thw", "video_grid_thw",
                  "video_second_per_grid")


def prompt_tensors(prompt: TalkerPrompt) -> dict[str, Tensor]:
    """The wire tensors of a `TalkerPrompt` (speaker and use_audio_in_video travel in `SpeakStart`)."""
    out = {name: getattr(prompt, name) for name in PROMPT_TENSORS}
    return {name: t for name, t in out.items() if t is not None}


class TalkerServicer(talker_pb2_grpc.TalkerServicer):
    service = "Talker"
    add_to_server = staticmethod(talker_pb2_grpc.add_TalkerServicer_to_server)

    def __init__(self, stage: TalkerStage):
        self.stage = stage

    async def Speak(self, requests: AsyncIterator[SpeakRequest],
                    context: grpc.aio.ServicerContext) -> AsyncIterator[SpeakResponse]:
        try:
            async with aclosing(self._speak(requests)) as frames:
                async for frame in frames:
                    yield frame
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # said in band first, for the same reason as `end`
            code, details = reported(e, "talker")
            yield SpeakResponse(end=SpeakEnd(code=code.value[0], details=details))
            await _read_out(requests)
            await context.abort(code, details)
        yield SpeakResponse(end=SpeakEnd())
        await _read_out(requests)

    async def _speak(self, requests: AsyncIterator[SpeakRequest]) -> AsyncIterator[SpeakResponse]:
        start = await read_start(requests, "Speak")
        REQUEST_ID.set(start.request_id)  # also names this request's MTP frames
        tensors, first = await read_tensors(requests, "prompt", PROMPT_TENSORS, until=("text", "text_end"))
        if first is None:
            raise InvalidInput("Speak: the stream ended before text_end")
        (input_ids,) = required(tensors, "input_ids")
        prompt = TalkerPrompt(input_ids=input_ids, speaker=start.speaker,
                              use_audio_in_video=start.use_audio_in_video, cache_key=start.cache_key,
                              keep=keep_from_proto(start.keep), mm_from=start.mm_from, rows_tag=start.rows_tag,
                              **{name: tensors.get(name) for name in PROMPT_TENSORS[1:]})
        sampling = sampling_from_proto(start.sampling) if start.HasField("sampling") else default_talker_sampling()
        if start.prefill_only and first.WhichOneof("kind") != "text_end":
            raise InvalidInput("Speak: a prefill_only request takes no text: send text_end after the prompt")
        max_frames = 0 if start.prefill_only else start.max_frames or DEFAULT_MAX_NEW_TOKENS
        frames = self.stage.speak(prompt, sampling, max_frames, _text(first, requests))
        async with aclosing(frames):
            async for codes in frames:
                yield SpeakResponse(frame=CodecFrame(codes=codes))


async def _read_out(requests: AsyncIterator[SpeakRequest]) -> None:
    """Drop what the client still sends until it stops, at most END_GRACE_S."""
    with suppress(TimeoutError):
        async with asyncio.timeout(END_GRACE_S):
            async for _ in requests:
                pass


async def _text(msg: SpeakRequest, requests: AsyncIterator[SpeakRequest]) -> AsyncIterator[int]:
    """Released tokens from `msg` on, pulled from the stream as the Talker asks; ends at text_end."""
    while (kind := msg.WhichOneof("kind")) != "text_end":
        if kind != "text":
            raise InvalidInput(f"Speak: expected text or text_end, got {kind or 'an empty message'}")
        for token in msg.text.token_ids:
            yield token
        msg = await anext(requests, None)
        if msg is None:
            raise InvalidInput("Speak: the stream ended before text_end")
