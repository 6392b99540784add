"""A small client of the `omni.v1.Omni` API for application code.

Stream a turn (text deltas as they are released, audio packets as they are synthesized, then the summary):

    from services.client import OmniClient
    from services.events import AudioChunk, TextDelta, TurnSummary

    async with OmniClient("localhost:50051") as client:
        async for event in client.converse(text="What do you hear?", audios=["question.wav"], speaker="chelsie",
                                           session_id="user-42"):
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)
            elif isinstance(event, AudioChunk):
                play(event.samples)  # float32, 24 kHz mono
            elif isinstance(event, TurnSummary):
                print(event.finish_reason, event.timings)

Or in blocking code, the whole answer at once:

    summary, samples = OmniClient("localhost:50051").converse_sync(text="Hello!", greedy=True)

A Thinking model's reasoning arrives as `ReasoningDelta` events before its text (the summary keeps it apart as
`reasoning`); `await client.describe()` says what a deployment serves (its variant, modalities, voices).

Inputs: a turn is an ordered list of parts, sent and heard in that order (`services.turn_parts`):

    from services.turn_parts import audio_part, image_part, text_part
    client.converse(parts=[text_part("This one:"), image_part("a.png"), text_part("and this one:"),
                           image_part("b.png"), audio_part("question.wav")])

An audio is a file path, encoded file bytes (WAV, FLAC, OGG), `(pcm, sample_rate)`, or a PCM array with the part's
`sample_rate`, `pcm` being int16 (or float, quantized to int16) of [samples] or [samples, channels]; an image a path
or encoded bytes; a video a `Video(frames, timestamps[, audio])` (or a mapping with those keys, `audio_sample_rate`
beside a raw track). The shorthand `text=`, `audios=`, `images=`, `videos=` stands for the parts in one fixed
order: every audio, then every image, every video, then the text (Qwen's examples' order); it cannot be mixed with
`parts=`. The same `session_id` on later turns continues the conversation (the server keeps the earlier turns, media
included). `turn.cancel()` (or `client.cancel()` for every open turn) stops a turn; its summary, with finish_reason
"cancelled", still arrives. Failures raise `ConverseError`, whose `code` is the gRPC status (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, UNAVAILABLE...).

Credentials: a deployment with authentication on (the default) wants `authorization: Bearer <key>`; the client
sends `api_key`, else `OMNI_API_KEY`, else the key a local `omni serve` wrote (`services.auth.local_key`). Bad or
missing credentials raise ConverseError with code UNAUTHENTICATED.

A client's channel belongs to the event loop that first used it; `converse_sync` runs its own loop and channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from services import auth
from services.engines.sampling import SamplingParams
from services.errors import InvalidInput, OmniError
from services.events import AudioChunk, Event, ReasoningDelta, TextDelta, TurnSummary, float_to_pcm16
from services.servicers.hooks import hook_event_from_proto
from services.turn_parts import audio_part, image_part, kind_counts, text_part, video_part
from services.wire.gen.omni.v1 import common_pb2, omni_pb2, omni_pb2_grpc
from services.wire.server import GRPC_OPTIONS, MAX_MESSAGE_BYTES

CHUNK_BYTES = 1 << 20  # media chunk size: well under the server's 8 MiB message limit
GATEWAY_METADATA = (("application", "omni"),)  # the gateway's Serve application name (deploy/*.yaml)
_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_BLOCKED: "blocked",
}

Audio = str | Path | bytes | tuple[np.ndarray, int]
Image = str | Path | bytes


@dataclass(frozen=True)
class Video:
    """Sampled frames (paths or encoded images, one size) with their times in seconds, and an optional sound
    track starting at the first frame."""

    frames: Sequence[Image]
    timestamps: Sequence[float]
    audio: Audio | None = None


@dataclass(frozen=True)
class DeploymentInfo:
    """What a deployment serves (`Omni/Describe`)."""

    variant: str  # "instruct", "thinking" or "captioner"
    model: str  # e.g. "Qwen3-Omni Thinking"
    input_modalities: tuple[str, ...]  # of "text", "audio", "image", "video"
    output_modalities: tuple[str, ...]  # "text", and "audio" with a Talker
    speakers: tuple[str, ...]
    reasoning: bool  # answers stream ReasoningDelta events
    input_rules: str  # what a request must be beyond its modalities; "" when nothing more


class ConverseError(OmniError):
    """The call ended with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class Turn:
    """One Converse call: an async iterator of TextDelta, AudioChunk and, last, the TurnSummary. The call starts
    on the first iteration."""

    def __init__(self, client: OmniClient, requests: list[omni_pb2.ConverseRequest], deadline_s: float | None):
        self._client = client
        self._requests = requests
        self._deadline_s = deadline_s
        self._call = None
        self._write_lock = asyncio.Lock()
        self._cancel_reason: str | None = None
        self.request_id: str | None = None  # the server's, once it has accepted the config
        self.session_id: str | None = None

    def __aiter__(self) -> Turn:
        return self

    async def __anext__(self) -> Event:
        if self._call is None:
            await self._start()
        while True:
            try:
                msg = await self._call.read()
            except grpc.aio.AioRpcError as e:
                self._client._turns.discard(self)
                raise ConverseError(e.code(), e.details()) from None
            if msg is grpc.aio.EOF:
                self._client._turns.discard(self)
                raise StopAsyncIteration
            kind = msg.WhichOneof("kind")
            if kind == "text":
                return TextDelta(text=msg.text.text, token_ids=tuple(msg.text.token_ids))
            elif kind == "reasoning":
                return ReasoningDelta(text=msg.reasoning.text, token_ids=tuple(msg.reasoning.token_ids))
            elif kind == "audio":
                samples = np.frombuffer(msg.audio.pcm16, "<i2").astype(np.float32) / 32767.0
                return AudioChunk(seq=msg.audio.seq, samples=samples, sample_rate=msg.audio.sample_rate)
            elif kind == "summary":
                await self._done_writing()  # nothing more to say: lets the server end the call
                return _summary(msg.summary)
            elif kind == "hook_event":
                return hook_event_from_proto(msg.hook_event)

    async def cancel(self, reason: str = "") -> None:
        """Stop the turn; the server still sends the summary of what it made so far."""
        self._cancel_reason = reason
        if self._call is not None:
            await self._write(omni_pb2.ConverseRequest(cancel=omni_pb2.Cancel(reason=reason)))

    async def close(self) -> None:
        """Abandon the call (the server sees a disconnect and frees the turn's state)."""
        if self._call is not None:
            self._call.cancel()
        self._client._turns.discard(self)

    async def _start(self) -> None:
        cancelled_early = self._cancel_reason is not None
        # Serve's gRPC proxy routes by the `application` metadata key (harmless against a bare gateway).
        self._call = self._client._stub().Converse(timeout=self._deadline_s, metadata=self._client.metadata)
        self._client._turns.add(self)
        config, *parts = self._requests
        self._requests = []
        # The parts follow the server's TurnStarted: a config it rejects ends the call before any upload (and
        # before a write could race the call's end, which grpc.aio reports as INTERNAL instead of the status).
        if not await self._write(config) or not await self._started():
            return
        if cancelled_early:
            await self._write(omni_pb2.ConverseRequest(cancel=omni_pb2.Cancel(reason=self._cancel_reason)))
            return
        for request in parts:
            if self._cancel_reason is not None or not await self._write(request):
                break

    async def _started(self) -> bool:
        """Wait for TurnStarted; False when the call ended instead (the next read raises its status)."""
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError:
            return False
        if msg is grpc.aio.EOF or msg.WhichOneof("kind") != "started":
            return False
        self.request_id, self.session_id = msg.started.request_id, msg.started.session_id
        return True

    async def _done_writing(self) -> None:
        async with self._write_lock:
            try:
                await self._call.done_writing()
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass

    async def _write(self, request: omni_pb2.ConverseRequest) -> bool:
        """False once the call has ended (its status then comes from the next read)."""
        async with self._write_lock:
            try:
                await self._call.write(request)
                return True
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                return False


class OmniClient:
    def __init__(self, address: str, *, api_key: str | None = None, chunk_bytes: int = CHUNK_BYTES):
        self.address = address
        self.api_key = api_key if api_key is not None else auth.local_key()
        self.chunk_bytes = chunk_bytes
        self._channel: grpc.aio.Channel | None = None
        self._stub_: omni_pb2_grpc.OmniStub | None = None
        self._turns: set[Turn] = set()

    async def __aenter__(self) -> OmniClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub_ = None

    def converse(
        self,
        text: str | None = None,
        audios: Sequence[Audio] = (),
        images: Sequence[Image] = (),
        videos: Sequence[Video] = (),
        *,
        parts: Sequence[Mapping] | None = None,
        speaker: str = "",
        session_id: str = "",
        request_id: str = "",
        system_prompt: str | None = None,
        history: Sequence[Mapping[str, str]] = (),
        audio_output: bool = True,
        greedy: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.8,
        top_k: int = 20,
        seed: int | None = None,
        max_new_tokens: int = 1024,
        max_audio_frames: int = 4096,
        metadata: Mapping[str, str] | None = None,
        deadline_s: float | None = None,
    ) -> Turn:
        """One turn; iterate the result for its events. The turn's content is `parts`, in order (see the module
        docstring), or the `text`/`audios`/`images`/`videos` shorthand, which is the parts every audio, then every
        image, every video, then the text; not both. `greedy` (argmax everywhere) or sampling with the given
        temperature/top_p/top_k/seed in the Thinker (the Talker then samples with the reference's defaults).
        `history`: earlier turns as {"role", "content"} text messages, for conversations kept by the client."""
        if parts is None:
            parts = [*(audio_part(a) for a in audios), *(image_part(i) for i in images),
                     *(video_part(v) for v in videos), *([text_part(text)] if text is not None else [])]
        elif text is not None or audios or images or videos:
            raise InvalidInput("give the turn as parts= or as text=/audios=/images=/videos=, not both: the parts "
                               "say the order, the shorthand has its own")
        thinker = SamplingParams(greedy=True) if greedy else SamplingParams(
            greedy=False, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        modalities = [omni_pb2.MODALITY_TEXT, omni_pb2.MODALITY_AUDIO] if audio_output else [omni_pb2.MODALITY_TEXT]
        config = omni_pb2.ConverseConfig(
            session_id=session_id, request_id=request_id, speaker=speaker, output_modalities=modalities,
            system_prompt=system_prompt, thinker_sampling=_sampling_message(thinker),
            max_new_tokens=max_new_tokens, max_audio_frames=max_audio_frames, metadata=dict(metadata or {}),
            history=[omni_pb2.ChatMessage(role=m["role"], text=m["content"]) for m in history],
        )
        requests = [omni_pb2.ConverseRequest(config=config)]
        kind_counts(parts)  # the list's shape; each value is checked as its messages are made
        for j, part in enumerate(parts):
            requests += self._part_messages(part, j)
        requests.append(omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn()))
        return Turn(self, requests, deadline_s)

    def _part_messages(self, part: Mapping, j: int) -> list[omni_pb2.ConverseRequest]:
        """One part's messages, in the order the server reads them: media ids are the part's index."""
        kind, value = part["type"], part.get(part["type"])
        if kind == "text":
            if not isinstance(value, str):
                raise InvalidInput(f"parts[{j}]: text must be a string, got {type(value).__name__}")
            return [omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text=value))]
        if kind == "audio":
            if isinstance(value, np.ndarray):
                if "sample_rate" not in part:
                    raise InvalidInput(f"parts[{j}]: a raw audio array needs 'sample_rate'")
                value = (value, part["sample_rate"])
            return self._audio_messages(value, f"a{j}")
        if kind == "image":
            return [omni_pb2.ConverseRequest(image=omni_pb2.ImageInput(image_id=f"i{j}", data=piece))
                    for piece in self._pieces(_read_file(value, f"image (parts[{j}])"))]
        video = _as_video(value, j)
        if len(video.frames) != len(video.timestamps):
            raise InvalidInput(f"parts[{j}]: video has {len(video.frames)} frames but {len(video.timestamps)} "
                               "timestamps")
        messages = [omni_pb2.ConverseRequest(video_frame=omni_pb2.VideoFrame(
            video_id=f"v{j}", timestamp_s=t, image=_frame_bytes(frame, f"parts[{j}] video frame {k}")))
            for k, (frame, t) in enumerate(zip(video.frames, video.timestamps))]
        if video.audio is not None:
            messages += self._audio_messages(video.audio, f"v{j}.audio", video_id=f"v{j}")
        return messages

    async def collect(self, on_text: Callable[[str], None] | None = None,
                      on_reasoning: Callable[[str], None] | None = None, **kwargs) -> tuple[TurnSummary, np.ndarray]:
        """Run a turn (`converse`'s arguments) to its end: the summary and the whole answer's float32 samples;
        `on_text` sees each text delta as it arrives, `on_reasoning` each reasoning delta."""
        chunks, summary = [], None
        async for event in self.converse(**kwargs):
            if isinstance(event, TextDelta) and on_text is not None:
                on_text(event.text)
            elif isinstance(event, ReasoningDelta) and on_reasoning is not None:
                on_reasoning(event.text)
            elif isinstance(event, AudioChunk):
                chunks.append(event.samples)
            elif isinstance(event, TurnSummary):
                summary = event
        if summary is None:
            raise ConverseError(grpc.StatusCode.INTERNAL, "the server ended the turn without a summary")
        return summary, np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def converse_sync(self, **kwargs) -> tuple[TurnSummary, np.ndarray]:
        """`collect` for blocking code (not from inside a running event loop)."""
        async def run():
            async with OmniClient(self.address, api_key=self.api_key, chunk_bytes=self.chunk_bytes) as client:
                return await client.collect(**kwargs)

        return asyncio.run(run())

    async def describe(self, deadline_s: float = 30.0) -> DeploymentInfo:
        """What the deployment serves: its model variant, modalities and voices."""
        try:
            info = await self._stub().Describe(omni_pb2.DescribeDeploymentRequest(), timeout=deadline_s,
                                               metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise ConverseError(e.code(), e.details()) from None
        names = {omni_pb2.MODALITY_TEXT: "text", omni_pb2.MODALITY_AUDIO: "audio"}
        return DeploymentInfo(
            variant=info.variant, model=info.model, input_modalities=tuple(info.input_modalities),
            output_modalities=tuple(names[m] for m in info.output_modalities if m in names),
            speakers=tuple(info.speakers), reasoning=info.reasoning, input_rules=info.input_rules)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Every call's metadata: the gateway's application (for Serve's proxy) and the credential, if any."""
        return GATEWAY_METADATA + call_credentials(self.api_key)

    async def cancel(self, reason: str = "") -> None:
        """Cancel every turn of this client still open."""
        await asyncio.gather(*(turn.cancel(reason) for turn in list(self._turns)))

    def _stub(self) -> omni_pb2_grpc.OmniStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=GRPC_OPTIONS)
            self._stub_ = omni_pb2_grpc.OmniStub(self._channel)
        return self._stub_

    def _pieces(self, data: bytes) -> list[bytes]:
        return [data[i:i + self.chunk_bytes] for i in range(0, max(len(data), 1), self.chunk_bytes)]

    def _audio_messages(self, audio: Audio, audio_id: str, video_id: str = "") -> list[omni_pb2.ConverseRequest]:
        if isinstance(audio, tuple):
            pcm, rate = audio
            pcm = np.asarray(pcm)
            channels = pcm.shape[1] if pcm.ndim == 2 else 1
            data = (pcm.astype("<i2") if pcm.dtype == np.int16 else float_to_pcm16(pcm)).tobytes()
            return [omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(
                audio_id=audio_id, pcm16=piece, sample_rate=rate, channels=channels, video_id=video_id))
                for piece in self._pieces(data)]
        return [omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(audio_id=audio_id, encoded=piece,
                                                                   video_id=video_id))
                for piece in self._pieces(_read_file(audio, "audio"))]


def call_credentials(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer metadata for `api_key` (none without one)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _frame_bytes(source: str | Path | bytes, what: str) -> bytes:
    """A video frame travels as one message, so it must fit gRPC's limit: checked here, because a message the
    server rejects for size can surface as INTERNAL instead of RESOURCE_EXHAUSTED (grpc/grpc#36066)."""
    data = _read_file(source, what)
    if len(data) > MAX_MESSAGE_BYTES - (64 << 10):
        raise InvalidInput(f"{what}: {len(data)} bytes; an encoded frame must be under "
                           f"{(MAX_MESSAGE_BYTES >> 20) - 1} MiB (compress it or lower its resolution)")
    return data


def _as_video(value, j: int) -> Video:
    if isinstance(value, Video):
        return value
    if isinstance(value, Mapping) and {"frames", "timestamps"} <= set(value):
        audio = value.get("audio")
        if isinstance(audio, np.ndarray):
            if "audio_sample_rate" not in value:
                raise InvalidInput(f"parts[{j}]: a raw audio track needs 'audio_sample_rate'")
            audio = (audio, value["audio_sample_rate"])
        return Video(frames=value["frames"], timestamps=value["timestamps"], audio=audio)
    raise InvalidInput(f"parts[{j}]: a video must be a Video or an object with 'frames' and 'timestamps'")


def _read_file(source: str | Path | bytes, what: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise InvalidInput(f"cannot read {what} {source}: {e.strerror}") from None


def _sampling_message(p: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(greedy=p.greedy, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                     repetition_penalty=p.repetition_penalty, seed=p.seed)


def _summary(s: omni_pb2.TurnSummary) -> TurnSummary:
    return TurnSummary(
        text=s.text, thinker_token_ids=list(s.thinker_token_ids), codes=[list(f.codes) for f in s.codes],
        sample_rate=s.sample_rate, num_samples=s.num_samples, speaker=s.speaker or None,
        finish_reason=_FINISH.get(s.finish_reason, "unspecified"), timings=dict(s.timings), reasoning=s.reasoning,
    )
