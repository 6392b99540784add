"""gRPC clients of the stages: each implements its `services.stages` Protocol over a `grpc.aio.Channel`, so a
`Conductor` given `remote_stages(...)` conducts a turn across processes exactly as it does in one.

Every call is one bidirectional stream (`protos/omni/v1`): a task writes the requests while the caller reads the
responses, big tensors cross as `TensorPiece`s, a failed call raises the domain error its status stands for
(`services.servicers.status`), and closing a stage's iterator early cancels the call, which frees the request's
state on the server. MTP is the exception to one-stream-per-call: see `RemoteMTP`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace

import grpc
import torch
from torch import Tensor

from services import tracing
from services.engines.mtp import MTPResult
from services.engines.sampling import SamplingParams
from services.engines.talker import TalkerPrompt
from services.engines.thinker import ThinkerPrompt
from services.engines.vision_encoder import VisionEmbeddings
from services.errors import InvalidInput, PrefixGone, ResourceExhausted
from services.hooks import HookContext, Released
from services.hooks.stage import plain_conversation
from services.servicers import KEEP_TO_PROTO, request_id, required, sampling_to_proto
from services.servicers.hooks import hook_event_from_proto
from services.servicers.mtp import MAX_IN_FLIGHT
from services.servicers.status import StageError, error_from, error_of, status_code
from services.servicers.talker import prompt_tensors as talker_prompt_tensors
from services.servicers.thinker import (
    EMBED_TENSORS,
    LAYOUT_TENSORS,
    PROMPT_TENSORS,
    segments_to_proto,
)
from services.servicers.thinker import prompt_tensors as thinker_prompt_tensors
from services.serving.resume import Replay
from services.stages import Codes, Embed, Stages, ThinkerToken
from services.wire import cluster_tls
from services.wire.cluster_tls import ClusterCredential
from services.wire.gen.omni.v1 import (
    audio_encoder_pb2_grpc,
    code2wav_pb2_grpc,
    hooks_pb2_grpc,
    mtp_pb2_grpc,
    talker_pb2_grpc,
    thinker_pb2_grpc,
    vision_encoder_pb2_grpc,
)
from services.wire.gen.omni.v1.audio_encoder_pb2 import EncodeAudioRequest, EncodeAudioStart
from services.wire.gen.omni.v1.code2wav_pb2 import DecodeFrames, DecodeRequest, DecodeStart
from services.wire.gen.omni.v1.common_pb2 import FINISH_REASON_LENGTH, FINISH_REASON_STOP, CodecFrame, Tokens
from services.wire.gen.omni.v1.hooks_pb2 import DescribeRequest, FilterRequest, FilterStart, HooksInfo
from services.wire.gen.omni.v1.mtp_pb2 import MTPAnswer, MTPFrame, PredictRequest
from services.wire.gen.omni.v1.talker_pb2 import SpeakRequest, SpeakStart, TextEnd
from services.wire.gen.omni.v1.thinker_pb2 import PromptEnd, ThinkEnd, ThinkRequest, ThinkStart
from services.wire.gen.omni.v1.vision_encoder_pb2 import EncodeVisionRequest, EncodeVisionStart
from services.wire.server import GRPC_OPTIONS, MAX_MESSAGE_BYTES
from services.wire.tensors import PieceAssembler, from_proto, to_pieces, to_proto

log = logging.getLogger(__name__)

STAGE_KEYS = ("audio", "vision", "thinker", "talker", "code2wav")  # `remote_stages` addresses, as Stages names them


class RemoteAudioEncoder:
    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self._stub = audio_encoder_pb2_grpc.AudioEncoderStub(channel)

    async def encode(self, input_features: Tensor, feature_attention_mask: Tensor) -> Tensor:
        async def requests():
            yield EncodeAudioRequest(start=EncodeAudioStart(request_id=rid))
            for name, t in (("input_features", input_features), ("feature_attention_mask", feature_attention_mask)):
                for piece in to_pieces(name, t):
                    yield EncodeAudioRequest(piece=piece)

        rid = request_id()
        tensors = await _tensors(_exchange(self._stub.EncodeAudio, requests(), "audio encoder"), "piece")
        return required(tensors, "audio_embeds")[0]


class RemoteVisionEncoder:
    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self._stub = vision_encoder_pb2_grpc.VisionEncoderStub(channel)

    async def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> VisionEmbeddings:
        async def requests():
            yield EncodeVisionRequest(start=EncodeVisionStart(request_id=rid))
            for name, t in (("pixel_values", pixel_values), ("grid_thw", grid_thw)):
                for piece in to_pieces(name, t):
                    yield EncodeVisionRequest(piece=piece)

        rid = request_id()
        tensors = await _tensors(_exchange(self._stub.EncodeVision, requests(), "vision encoder"), "piece")
        embeds, deepstack = required(tensors, "embeds", "deepstack")
        return VisionEmbeddings(embeds=embeds, deepstack=list(deepstack))


class RemoteThinker:
    """`stop_ids` of `generate` are the server's: the Thinker stage stops at its checkpoint's stop tokens."""

    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self._stub = thinker_pb2_grpc.ThinkerStub(channel)

    async def generate(self, prompt: ThinkerPrompt, sampling: SamplingParams, max_new_tokens: int,
                       stop_ids: frozenset[int], embed: Embed | None = None) -> AsyncIterator[ThinkerToken]:
        asked: asyncio.Queue[int] = asyncio.Queue()  # the server's `prefix`: where the media it needs start

        async def requests():
            # mm_hidden is always asked for: ThinkerStage yields it with the first token, as LocalThinker does.
            yield ThinkRequest(start=ThinkStart(
                request_id=rid, sampling=sampling_to_proto(sampling), max_new_tokens=max_new_tokens,
                use_audio_in_video=prompt.use_audio_in_video, return_mm_hidden=True, cache_key=prompt.cache_key,
                segments=segments_to_proto(prompt), defer_media=embed is not None, keep=KEEP_TO_PROTO[prompt.keep],
                prefill_only=max_new_tokens == 0, mm_hidden_from=prompt.hidden_from))
            for msg in _prompt_messages(prompt, PROMPT_TENSORS if embed is None else LAYOUT_TENSORS):
                yield msg
            if embed is not None:  # then the media the server asks for
                for msg in _prompt_messages(await embed(await asked.get()), EMBED_TENSORS):
                    yield msg
            # then half-close: no resume

        rid = request_id()
        assembler, mm_hidden, mm_from = PieceAssembler(), None, 0
        async with aclosing(_exchange(self._stub.Think, requests(), "thinker")) as responses:
            async for resp in responses:
                kind = resp.WhichOneof("kind")
                if kind == "prefix":
                    asked.put_nowait(resp.prefix.reused_tokens)
                elif kind == "mm_hidden_from":
                    mm_from = resp.mm_hidden_from
                elif kind == "mm_hidden":
                    if done := assembler.add(resp.mm_hidden):
                        mm_hidden = done.tensor
                elif kind == "tokens":
                    for token in resp.tokens.token_ids:
                        yield ThinkerToken(token, mm_hidden, mm_from)
                        mm_hidden = None
                elif kind == "end" and max_new_tokens == 0:  # prefill only: its one item
                    yield ThinkerToken(None, mm_hidden, mm_from)
                # after "end" the server closes the stream, since we half-closed


def _prompt_messages(prompt: ThinkerPrompt, names: tuple[str, ...]) -> Iterator[ThinkRequest]:
    """The prompt's tensors of `names` in pieces, then `prompt_end`."""
    for name, t in thinker_prompt_tensors(prompt).items():
        if name in names:
            for piece in to_pieces(name, t):
                yield ThinkRequest(prompt=piece)
    yield ThinkRequest(prompt_end=PromptEnd())


class RemoteMTP:
    """MTP over ONE bidirectional stream per instance (per Talker replica), shared by all its concurrent requests:
    frames cost messages on an open stream, not a new call. The frames that requests queue while the stream is
    writing, or in one turn of the event loop (a Talker step's: its requests wake together), leave as one message,
    so they reach MTP together and share its step. Each frame is keyed by a sequence number of this instance (sent
    as `frame`, with the turn's request id for logs) and its answer resolves that frame's future, whatever order
    answers come in. A broken stream fails the frames in flight and the next frame opens a new one. Create and use
    it in one event loop."""

    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self._stub = mtp_pb2_grpc.MTPStub(channel)
        self._keys = itertools.count()
        self._stream: _MTPStream | None = None

    async def predict(self, hidden: Tensor, c0: Tensor, greedy: bool, seed: int | None) -> MTPResult:
        """hidden: [B, H], c0: [B]; one frame per row."""
        if hidden.ndim != 2 or tuple(c0.shape) != tuple(hidden.shape[:1]):
            raise InvalidInput(f"MTP wants hidden [B, H] and c0 [B], got {tuple(hidden.shape)} and {tuple(c0.shape)}")
        if self._stream is None or self._stream.error is not None:
            self._stream = _MTPStream(self._stub.Predict())
        stream, rid, trace_context = self._stream, request_id(), tracing.carrier()
        keys = [next(self._keys) for _ in range(hidden.shape[0])]
        try:
            futures = []
            for key, h, c in zip(keys, hidden, c0.tolist()):
                msg = MTPFrame(request_id=rid, frame=key, hidden=to_proto(h), c0=c, greedy=greedy,
                               trace_context=trace_context)
                if seed is not None:
                    msg.seed = seed
                futures.append(stream.send(msg))
            answers = await asyncio.gather(*futures)
        finally:  # a cancelled caller's answers are dropped when they come
            for key in keys:
                stream.pending.pop(key, None)
        return MTPResult(codes=torch.tensor([list(a.codes.codes) for a in answers], dtype=torch.long),
                         embed_sum=torch.stack([from_proto(a.embed_sum) for a in answers]))

    async def close(self) -> None:
        """End the stream (frames in flight fail with CANCELLED); a later `predict` opens a new one."""
        if self._stream is not None:
            await self._stream.close()


class _MTPStream:
    """One open Predict call: a writer task sends the queued frames, a reader task resolves their futures. Callers
    never write themselves: grpc cancels a call when a task is cancelled inside its write, and one cancelled
    request must not end the stream for every other. The writer sends every frame queued by the time it runs in one
    message: it wakes after the callers that were ready with the first frame's."""

    def __init__(self, call: grpc.aio.StreamStreamCall):
        self.call = call
        self.pending: dict[int, asyncio.Future[MTPAnswer]] = {}
        self.error: Exception | None = None  # set once the stream has ended
        self._outbox: asyncio.Queue[MTPFrame] = asyncio.Queue()  # bounded by the Talker's open requests
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    def send(self, msg: MTPFrame) -> asyncio.Future[MTPAnswer]:
        if self.error is not None:
            raise self.error
        future = self.pending[msg.frame] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait(msg)
        return future

    async def _write(self) -> None:
        try:
            while True:
                frames = [await self._outbox.get()]
                while not self._outbox.empty() and len(frames) < MAX_IN_FLIGHT:  # what the server takes at once
                    frames.append(self._outbox.get_nowait())
                await self.call.write(PredictRequest(frames=frames))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call has ended: the reader reports why

    async def _read(self) -> None:
        try:
            while (resp := await self.call.read()) is not grpc.aio.EOF:
                for answer in resp.answers:
                    future = self.pending.get(answer.frame)
                    if future is not None and not future.done():
                        future.set_result(answer)
            self.error = StageError(grpc.StatusCode.UNAVAILABLE, "mtp stage: the server closed the stream")
        except grpc.aio.AioRpcError as e:
            self.error = error_of(e, "mtp")
        except asyncio.CancelledError:  # close()
            self.error = StageError(grpc.StatusCode.CANCELLED, "mtp stage: the stream was closed")
        self._writer.cancel()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self.error)

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await asyncio.wait([self._reader, self._writer])


class RemoteTalker:
    """The Talker stage; its replicas call MTP themselves."""

    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self._stub = talker_pb2_grpc.TalkerStub(channel)

    async def speak(self, prompt: TalkerPrompt, sampling: SamplingParams, max_frames: int,
                    text: AsyncIterator[int]) -> AsyncIterator[Codes]:
        """`prompt.mm_hidden` whole: only its rows from `mm_from` on are sent, and all of them again when the
        replica no longer holds the others (PrefixGone, before any frame), the text sent again too."""
        if not prompt.mm_from or prompt.mm_hidden is None:
            async for codes in self._speak(replace(prompt, mm_from=0), sampling, max_frames, text):
                yield codes
            return
        text, spoke = Replay(text), False
        try:
            try:
                async for codes in self._speak(replace(prompt, mm_hidden=prompt.mm_hidden[prompt.mm_from:]), sampling,
                                               max_frames, text.reader()):
                    spoke = True
                    yield codes
                return
            except PrefixGone:
                if spoke:  # it comes before any frame; after one, sending again would repeat them
                    raise
                log.info("talker replica lacks the turn's first %d media rows: sending them all", prompt.mm_from)
            async for codes in self._speak(replace(prompt, mm_from=0), sampling, max_frames, text.reader()):
                yield codes
        finally:
            await text.close()

    async def _speak(self, prompt: TalkerPrompt, sampling: SamplingParams, max_frames: int,
                     text: AsyncIterator[int]) -> AsyncIterator[Codes]:
        async def requests():
            yield SpeakRequest(start=SpeakStart(
                request_id=rid, speaker=prompt.speaker, sampling=sampling_to_proto(sampling), max_frames=max_frames,
                use_audio_in_video=prompt.use_audio_in_video, cache_key=prompt.cache_key,
                keep=KEEP_TO_PROTO[prompt.keep], prefill_only=max_frames == 0, mm_from=prompt.mm_from,
                rows_tag=prompt.rows_tag))
            for name, t in talker_prompt_tensors(prompt).items():
                for piece in to_pieces(name, t):
                    yield SpeakRequest(prompt=piece)
            async for token in text:  # as the conductor releases them; the server waits when it is ahead
                yield SpeakRequest(text=Tokens(token_ids=[token]))
            yield SpeakRequest(text_end=TextEnd())

        rid = request_id()
        async with aclosing(_exchange(self._stub.Speak, requests(), "talker")) as responses:
            async for resp in responses:
                if resp.WhichOneof("kind") == "end":  # no frame follows: leaving cancels the call (and our writes)
                    if resp.end.code:
                        raise error_from(status_code(resp.end.code), resp.end.details, "talker")
                    return
                yield tuple(resp.frame.codes)


class RemoteCode2Wav:
    def __init__(self, channel: grpc.aio.Channel):
        self.channel = channel
        self._stub = code2wav_pb2_grpc.Code2WavStub(channel)

    async def decode(self, frames: AsyncIterator[Codes]) -> AsyncIterator[Tensor]:
        async def requests():
            yield DecodeRequest(start=DecodeStart(request_id=rid))
            async for codes in frames:
                yield DecodeRequest(frames=DecodeFrames(frames=[CodecFrame(codes=codes)]))

        rid = request_id()
        async with aclosing(_exchange(self._stub.Decode, requests(), "code2wav")) as responses:
            async for resp in responses:
                yield from_proto(resp.samples, copy=True)  # handed to application code: give it writable memory


class RemoteHooks:
    """The hook stage over `omni.v1.Hooks` (a `services.hooks.HookStage`): one lockstep Filter stream per turn,
    one round trip per Thinker token (~0.5 ms on loopback, against tens of ms per token on a GPU Thinker)."""

    INFO_TTL_S = 10.0  # how long Describe's answer (the tools) is reused: it changes only with a redeploy

    def __init__(self, channel: grpc.aio.Channel, hooks: Sequence[str] = ()):
        self.channel = channel
        self.hooks = list(hooks)  # the stage's filters to run, in order; empty: its whole chain
        self._stub = hooks_pb2_grpc.HooksStub(channel)
        self._info: HooksInfo | None = None
        self._info_at = -float("inf")

    async def describe(self) -> HooksInfo:
        if time.monotonic() - self._info_at > self.INFO_TTL_S:
            try:
                self._info = await self._stub.Describe(DescribeRequest(), timeout=30)
            except grpc.aio.AioRpcError as e:
                raise error_of(e, "hooks") from None
            self._info_at = time.monotonic()
        return self._info

    async def tool_schemas(self) -> list[dict] | None:
        info = await self.describe()
        return json.loads(info.tools_json) if info.tools_json else None

    @asynccontextmanager
    async def open(self, ctx: HookContext) -> AsyncIterator[_RemoteHookTurn]:
        call = self._stub.Filter(metadata=tracing.metadata())
        try:
            turn = _RemoteHookTurn(call)
            await turn.write(FilterRequest(start=FilterStart(
                request_id=ctx.request_id or request_id(), session_id=ctx.session_id, hooks=self.hooks,
                metadata=dict(ctx.metadata), conversation_json=json.dumps(plain_conversation(ctx.conversation)),
                principal=ctx.principal)))
            yield turn
        finally:
            call.cancel()  # no-op once the call has ended


class _RemoteHookTurn:
    """One turn's Filter call: each `feed`/`thinker_end` writes one message and reads the answer to it."""

    def __init__(self, call: grpc.aio.StreamStreamCall):
        self._call = call

    async def feed(self, token_id: int) -> Released:
        return await self._ask(FilterRequest(tokens=Tokens(token_ids=[token_id])), final=False)

    async def thinker_end(self, stopped: bool) -> Released:
        reason = FINISH_REASON_STOP if stopped else FINISH_REASON_LENGTH
        return await self._ask(FilterRequest(thinker_end=ThinkEnd(finish_reason=reason)), final=True)

    async def write(self, request: FilterRequest) -> None:
        check_size(request, "hooks")
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as e:
            raise error_of(e, "hooks") from None
        except asyncio.InvalidStateError:  # the stage ended the call: its status says why
            try:
                await self._call.read()
            except grpc.aio.AioRpcError as e:
                raise error_of(e, "hooks") from None
            raise StageError(grpc.StatusCode.INTERNAL, "hooks stage: the call ended before the turn did") from None

    async def _ask(self, request: FilterRequest, final: bool) -> Released:
        await self.write(request)
        out = Released()
        try:
            while (msg := await self._call.read()) is not grpc.aio.EOF:
                kind = msg.WhichOneof("kind")
                if kind == "event":
                    out.events.append(hook_event_from_proto(msg.event))
                elif kind == "released":
                    out.token_ids, out.text, out.stop = list(msg.released.token_ids), msg.released.text, \
                        msg.released.blocked
                    out.reasoning, out.reasoning_ids = msg.released.reasoning, list(msg.released.reasoning_token_ids)
                    if not (final or out.stop):
                        return out
                elif kind == "resume":
                    out.resume = list(msg.resume.token_ids)
                    return out
                elif kind == "end":
                    return out
        except grpc.aio.AioRpcError as e:
            raise error_of(e, "hooks") from None
        raise StageError(grpc.StatusCode.INTERNAL, "hooks stage: the stream ended without answering")


def remote_stages(addresses: Mapping[str, str], processor, speakers: dict[str, int], stop_ids: frozenset[int],
                  sample_rate: int = 24000, channel_options: list[tuple[str, int]] = GRPC_OPTIONS,
                  credential: ClusterCredential | None = None) -> Stages:
    """Stages over gRPC. `addresses` maps "audio", "vision", "thinker", and for spoken answers "talker" and
    "code2wav", to "host:port" (stages at one address share a channel). The checkpoint facts (processor, speakers,
    stop ids, sample rate) come from the caller, who reads them from the same checkpoint as the stages.
    `credential`: the cluster credential the stages' servers were started with (mutual TLS); None: plaintext."""
    unknown = set(addresses) - set(STAGE_KEYS)
    missing = {"audio", "vision", "thinker"} - set(addresses)
    if unknown or missing or ("talker" in addresses) != ("code2wav" in addresses):
        raise ValueError(f"remote_stages needs audio, vision and thinker, and talker with code2wav, of "
                         f"{', '.join(STAGE_KEYS)}; got {sorted(addresses)}")
    channels: dict[str, grpc.aio.Channel] = {}

    def client(key: str, cls: Callable[[grpc.aio.Channel], object]):
        address = addresses.get(key)
        if address is None:
            return None
        if address not in channels:
            channels[address] = cluster_tls.channel(address, credential, channel_options)
        return cls(channels[address])

    talker = client("talker", RemoteTalker)
    return Stages(
        processor=processor,
        audio=client("audio", RemoteAudioEncoder),
        vision=client("vision", RemoteVisionEncoder),
        thinker=client("thinker", RemoteThinker),
        talker=talker,
        code2wav=client("code2wav", RemoteCode2Wav),
        speakers=speakers if talker is not None else {},
        stop_ids=stop_ids,
        sample_rate=sample_rate,
    )


async def close_stages(stages: Stages) -> None:
    """Close the channels of `remote_stages`."""
    members = (stages.audio, stages.vision, stages.thinker, stages.talker, stages.code2wav)
    for channel in {id(m.channel): m.channel for m in members if hasattr(m, "channel")}.values():
        await channel.close()


async def _exchange(method: Callable[..., grpc.aio.StreamStreamCall], requests: AsyncIterator,
                    stage: str) -> AsyncIterator:
    """One bidirectional call: a task writes `requests` (then half-closes) while this yields the responses.
    Leaving early cancels the call; a failed call raises its domain error, or what the requests raised."""
    call = method(metadata=tracing.metadata())  # the caller's trace context, continued by the stage's server
    writer = asyncio.create_task(_write(call, requests, stage))
    writer.add_done_callback(lambda t: t.cancelled() or t.exception())  # read below, or not needed
    try:
        while (resp := await call.read()) is not grpc.aio.EOF:
            yield resp
    except (grpc.aio.AioRpcError, asyncio.CancelledError) as e:
        if writer.done() and not writer.cancelled() and writer.exception() is not None:
            raise writer.exception() from None  # our requests failed first, which cancelled the call
        if isinstance(e, grpc.aio.AioRpcError):
            raise error_of(e, stage) from None
        raise
    finally:
        call.cancel()  # no-op once the call has ended
        writer.cancel()


def check_size(msg, stage: str) -> None:
    """Refuse a request message the stage would refuse for its size (its `grpc.max_receive_message_length`), before
    writing it: grpc.aio reports a write the server refused as INTERNAL "Internal error from Core" (grpc/grpc#36066),
    not the server's RESOURCE_EXHAUSTED. Tensors cross in pieces well below the limit; what can pass it is text: the
    hooks stage's conversation (a turn's text, a session's history)."""
    if (size := msg.ByteSize()) > MAX_MESSAGE_BYTES:
        raise ResourceExhausted(f"the request to the {stage} stage would be one message of {size:,} bytes, more than "
                                f"a stage accepts ({MAX_MESSAGE_BYTES:,}): the turn's text and the session's history "
                                "are too long; send less text or start a new session")


async def _write(call: grpc.aio.StreamStreamCall, requests: AsyncIterator, stage: str) -> None:
    try:
        async for msg in requests:
            check_size(msg, stage)
            await call.write(msg)
        await call.done_writing()
    except Exception:
        if call.done():  # the server has ended the call (with frames to spare, or an error the reader reports)
            return
        call.cancel()
        raise


async def _tensors(responses: AsyncIterator, piece_field: str) -> dict[str, Tensor]:
    """Assemble every `piece_field` piece of a response stream into named tensors."""
    assembler, tensors = PieceAssembler(), {}
    async with aclosing(responses):
        async for resp in responses:
            if done := assembler.add(getattr(resp, piece_field)):
                tensors[done.name] = done.tensor
    assembler.finish()
    return tensors
