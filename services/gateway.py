"""The client API: `omni.v1.Omni/Converse`, one conversation turn over one bidirectional stream.

    client ── config, input parts..., end_of_turn, [cancel] ──> OmniServicer ── TurnRequest ──> Conductor(stages)
    client <── started, text deltas, audio chunks..., summary ── OmniServicer <── events ───────────┘

The servicer only translates (protos/omni/v1/omni.proto defines the message flow): it assembles the input parts into
a `TurnRequest`, in arrival order (`_TurnInput`; the session's history in front), runs the conductor, and turns its
events into responses and its domain errors into status codes; `Describe` says what the deployment serves
(`deployment_info`). While the parts still arrive, `services.live_input` has the Thinker prefill what of them is
complete (media before the last part, a PCM audio's whole encoder windows), so that `end_of_turn` leaves it the
tail only. On every exit path (answer, error, cancel message, client disconnect, deadline) the conductor's
event iterator is closed before the handler returns, which cancels every stage and frees the request's state; other
streams never see one stream's failure.

Call lifetime: a rejected config ends the call at once, so a client sends its parts after TurnStarted (the client
library does). A part that fails (over the limit, malformed) ends the call only after the client's end_of_turn,
the rest of the input read and dropped; after the summary the server waits for the client to half-close (at most
HALF_CLOSE_GRACE_S). Both keep a client's write from meeting an ended call, which grpc.aio reports to that client
as INTERNAL instead of the real status (grpc/grpc#36066).

Limits:
- One message: the server's `grpc.max_receive_message_length` (`services.wire.server.GRPC_OPTIONS`, 8 MiB): gRPC
  itself rejects a bigger message with RESOURCE_EXHAUSTED before any code here runs. Media therefore arrive in
  chunks (the client library sends 1 MiB chunks).
- One turn: `max_request_bytes` of input (text and media bytes, summed as they arrive): once the sum passes it the
  server buffers nothing more and the call ends with RESOURCE_EXHAUSTED, so no client makes it hold more than that
  per turn. This also holds where a proxy in front accepts bigger messages than 8 MiB (Ray Serve's gRPC proxy
  accepts up to 2 GiB by default).
- Decoded media: `max_decoded_pixels` and `max_decoded_samples` per turn, charged from each input's header before
  anything is decoded (`services.media_budget`); past either, RESOURCE_EXHAUSTED naming the input. PCM audio is
  charged as its chunks arrive, and a live prefill that passes the Thinker's limits ends the turn too, there and
  then (the rest of the input read and dropped, as above).
- A config: fixed caps (`_check_config_limits`) checked when it arrives, before TurnStarted.
- Time: the client's deadline, capped at `default_deadline_s`; past it the turn ends with DEADLINE_EXCEEDED. Input
  must keep coming: no message for `input_idle_s` before end_of_turn ends the call with DEADLINE_EXCEEDED, so a
  stream that never finishes its turn does not hold a slot.
- Slots: at most `max_turns` calls at once in this replica and `max_turns_per_principal` per principal; one more is
  refused at once with RESOURCE_EXHAUSTED and a retry hint (`grpc-retry-pushback-ms` trailing metadata) instead of
  waiting. Serve's `max_ongoing_requests` for the gateway must stay above `max_turns` (deploy/*.yaml), or Serve's
  proxy queues the excess before this check sees it.

Who: with an `Authenticator`, every call (Converse and Describe) needs a bearer credential (`services.auth`);
without one, UNAUTHENTICATED. The principal owns the turn's session (another principal's same `session_id` is
another conversation) and is on the turn's logs, trace span and text-filter context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import NoReturn

import grpc
import numpy as np
from opentelemetry import trace as otel_trace

from services import auth, metrics, tracing
from services.conductor import Conductor, MediaRows, TurnRequest, text_only_message
from services.engines.sampling import SamplingParams
from services.errors import DeadlineExceeded, InvalidInput, OmniError, ResourceExhausted
from services.events import AudioChunk, Event, HookEvent, ReasoningDelta, TextDelta, TurnSummary
from services.hooks import FilterChain, HookStage
from services.live_input import LivePrefill
from services.log_mel import LogMelExtractor
from services.media_budget import DEFAULT_MAX_DECODED_PIXELS, DEFAULT_MAX_DECODED_SAMPLES, MediaBudget
from services.preprocess import AudioInput, PcmStream, decode_audio, load_video
from services.sessions import History, SessionStore, SessionStoreError, check_session_id
from services.servicers.hooks import hook_event_to_proto
from services.servicers.status import error_of, status_of
from services.stages import Stages
from services.turn_parts import audio_part, image_part, text_part, video_part
from services.wire.gen.omni.v1 import common_pb2, omni_pb2, omni_pb2_grpc
from services.wire.omni_api import Undecodable, add_OmniServicer_to_server
from services.wire.server import GRPC_OPTIONS, SERVICE_NAMES, add_standard_services

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 << 20  # 10 min of 48 kHz mono PCM16 is 58 MB
DEFAULT_DEADLINE_S = 600.0
DEFAULT_SPEAKER = "ethan"
HALF_CLOSE_GRACE_S = 5.0  # how long a finished call waits for the client to half-close
DEFAULT_INPUT_IDLE_S = 30.0
DEFAULT_MAX_TURNS = 32
DEFAULT_MAX_TURNS_PER_PRINCIPAL = 16
RETRY_PUSHBACK_MS = 1000  # the hint a refused call gets: gRPC's retry pushback trailer
REFUSE_READ_S = 1.0  # how long a refused call waits for the client's config before it ends

_FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "blocked": common_pb2.FINISH_REASON_BLOCKED,
}
_SAMPLING_FIELDS = ("greedy", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


class OmniServicer(omni_pb2_grpc.OmniServicer):
    def __init__(self, stages: Stages, sessions: SessionStore, *, hooks: FilterChain | HookStage | None = None,
                 authenticator: auth.Authenticator | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, default_deadline_s: float = DEFAULT_DEADLINE_S,
                 stage_timeout_s: float = 300.0, input_idle_s: float = DEFAULT_INPUT_IDLE_S,
                 max_turns: int = DEFAULT_MAX_TURNS, max_turns_per_principal: int = DEFAULT_MAX_TURNS_PER_PRINCIPAL,
                 max_decoded_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
                 max_decoded_samples: int = DEFAULT_MAX_DECODED_SAMPLES, live_prefill: bool = True):
        self.stages = stages
        self.sessions = sessions
        self.authenticator = authenticator  # None: no authentication (in-process use, or turned off)
        self.conductor = Conductor(stages, hooks=hooks, stage_timeout_s=stage_timeout_s)
        self.max_request_bytes = max_request_bytes
        self.max_decoded_pixels, self.max_decoded_samples = max_decoded_pixels, max_decoded_samples
        self.default_deadline_s = default_deadline_s
        self.input_idle_s = input_idle_s
        self.max_turns = max_turns
        self.max_turns_per_principal = max_turns_per_principal
        self.live_prefill = live_prefill  # prefill a turn while its input streams in (services.live_input)
        feature_extractor = stages.processor.feature_extractor
        self.window_s = stages.audio_window.frames * feature_extractor.hop_length / feature_extractor.sampling_rate
        self.active_turns = 0  # turns whose handler has not returned yet (their stages may hold state)
        self._turns_of: dict[str, int] = {}  # principal id -> its active turns
        self._labelled: set[str] = set()  # principals with their own metrics series

    async def Converse(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        # Requests are read with context.read(), not the iterator: a cancel message may arrive while answering.
        try:
            principal = await self._authenticate(context)
        except OmniError as e:
            metrics.REFUSALS.inc(reason="unauthenticated")
            await _refuse(context, *status_of(e))
        if (refusal := self._admit(principal)) is not None:
            metrics.REFUSALS.inc(reason=refusal[0])
            context.set_trailing_metadata([("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS))])
            await _refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal[1])
        self._count_principal(principal.id)
        self.active_turns += 1
        self._turns_of[principal.id] = self._turns_of.get(principal.id, 0) + 1
        metrics.ONGOING_TURNS.set(self.active_turns)
        remaining = context.time_remaining()
        budget = self.default_deadline_s if remaining is None else min(remaining, self.default_deadline_s)
        try:
            async with asyncio.timeout(budget):
                await self._converse(context, principal)
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"the turn did not finish within {budget:.3g} s")
        except SessionStoreError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except OmniError as e:  # the same mapping as every stage servicer; a stage's own status passes through
            await context.abort(*status_of(e))
        except grpc.aio.AioRpcError as e:  # a stage's gRPC client surfaced its call's status: pass it on
            await context.abort(*status_of(error_of(e, "a")))  # logged there; no internal addresses
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            log.exception("Converse failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
        finally:
            self.active_turns -= 1
            if (left := self._turns_of.pop(principal.id) - 1) > 0:
                self._turns_of[principal.id] = left
            metrics.ONGOING_TURNS.set(self.active_turns)

    async def Describe(self, request: omni_pb2.DescribeDeploymentRequest,
                       context: grpc.aio.ServicerContext) -> omni_pb2.DeploymentInfo:
        try:
            await self._authenticate(context)
        except OmniError as e:
            await context.abort(*status_of(e))
        return deployment_info(self.stages)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> auth.Principal:
        if self.authenticator is None:
            return auth.ANONYMOUS
        return await self.authenticator.authenticate(context.invocation_metadata())

    def _admit(self, principal: auth.Principal) -> tuple[str, str] | None:
        """Why a new call is refused now (a metrics reason and a message), or None to admit it."""
        if self.active_turns >= self.max_turns:
            return "gateway_full", (f"the gateway is serving its limit of {self.max_turns} turns at once; retry in a "
                                    "moment (or ask the operator for more gateway replicas)")
        if self._turns_of.get(principal.id, 0) >= self.max_turns_per_principal:
            return "principal_limit", (f"{self.max_turns_per_principal} turns of yours are open at once, the limit; "
                                       "finish or cancel one first")
        return None

    def _count_principal(self, principal: str) -> None:
        if principal not in self._labelled and len(self._labelled) < metrics.MAX_PRINCIPAL_LABELS:
            self._labelled.add(principal)
        metrics.PRINCIPAL_TURNS.inc(principal=principal if principal in self._labelled else "other")

    async def _converse(self, context: grpc.aio.ServicerContext, principal: auth.Principal) -> None:
        t0 = time.perf_counter()
        config, options = await self._read_config(context, principal)
        # A session belongs to its principal: the same id from another principal is another conversation. Its
        # history is read before the parts, which are prefilled after it as they arrive.
        try:
            history = await self.sessions.load(config.session_id, owner=principal.id) if config.session_id \
                else History()
        except SessionStoreError:
            await _drain(context)
            raise
        conversation = history.conversation() + [{"role": m.role, "content": m.text} for m in config.history]
        parts = _TurnInput(budget=MediaBudget.for_processor(self.stages.processor, self.max_decoded_pixels,
                                                            self.max_decoded_samples))
        rows = MediaRows()  # the Thinker's output for the Talker, from the live prefills to the answer
        live = LivePrefill(self.conductor, options, conversation, parts, self.window_s, rows) \
            if self.live_prefill and not config.defer_prefill else None
        try:
            try:
                complete = await self._read_parts(context, parts, live)
            except DeadlineExceeded:
                raise  # the client stopped sending: nothing to drain
            except OmniError:
                await _drain(context)
                raise
            if live is not None:
                await live.settle()
        finally:
            if live is not None:
                await live.close()
        inbox, outbox = _Inbox(context), _Outbox(context)
        try:
            if not complete:  # cancelled before end_of_turn
                summary = self._cancelled_summary(options, _Progress(), t0)
            else:
                summary = await self._turn(outbox, config, options, parts, history, conversation, inbox, t0, rows)
            await outbox.write(_summary_message(summary))
            await asyncio.wait({inbox.task}, timeout=HALF_CLOSE_GRACE_S)  # a late cancel must not meet an ended call
        finally:
            await _finish(inbox.task)

    async def _read_config(self, context: grpc.aio.ServicerContext,
                           principal: auth.Principal) -> tuple[omni_pb2.ConverseConfig, TurnRequest]:
        first = await self._next(context)
        if first is None or first.WhichOneof("kind") != "config":
            raise InvalidInput("the first message must be config")
        config = first.config
        config.request_id = config.request_id or uuid.uuid4().hex  # before the options: every stage call carries it
        options = replace(self._options(config), principal=principal.id)
        otel_trace.get_current_span().set_attribute("omni.principal", principal.id)
        log.info("turn %s (principal %r, session %r) started; metadata %s", config.request_id, principal.id,
                 config.session_id, dict(config.metadata))
        await context.write(omni_pb2.ConverseResponse(
            started=omni_pb2.TurnStarted(request_id=config.request_id, session_id=config.session_id)))
        return config, options

    async def _turn(self, outbox: _Outbox, config: omni_pb2.ConverseConfig, options: TurnRequest,
                    parts: _TurnInput, history: History, conversation: list[dict], inbox: _Inbox,
                    t0: float, rows: MediaRows) -> TurnSummary:
        """Run a committed turn with its session's history; a finished answer joins the session."""
        owner, sid = options.principal, config.session_id
        if sid and history.nbytes + parts.nbytes > (limit := self.sessions.quotas.max_session_bytes):
            raise ResourceExhausted(f"session {sid!r} would hold {history.nbytes + parts.nbytes} bytes with this turn, "
                                    f"over the limit of {limit} bytes per session; start a new session_id (or send "
                                    "smaller media)")
        req, user_message = await asyncio.to_thread(parts.request, options, conversation)
        summary = await self._answer(outbox, req, inbox, t0, rows)
        if summary.finish_reason != "cancelled":  # the conductor has recorded the turn's metrics
            if config.session_id:
                answer = {"role": "assistant", "content": summary.text}
                await self.sessions.append(sid, [user_message, answer], system=req.system, owner=owner)
        log.info("turn %s finished: %s, %d tokens, %d frames", config.request_id, summary.finish_reason,
                 len(summary.thinker_token_ids), len(summary.codes))
        return summary

    def _options(self, config: omni_pb2.ConverseConfig) -> TurnRequest:
        """The config as a TurnRequest without input; checked here so that a bad config fails before any upload."""
        _check_config_limits(config)
        if config.talker_style:
            raise InvalidInput("talker_style is not supported yet; leave it empty")
        modalities = set(config.output_modalities) - {omni_pb2.MODALITY_UNSPECIFIED}
        # Unset: what the deployment serves.
        audio_output = omni_pb2.MODALITY_AUDIO in modalities if modalities else self.stages.talker is not None
        speaker = config.speaker or DEFAULT_SPEAKER
        if audio_output:
            if self.stages.talker is None:
                raise InvalidInput(text_only_message(self.stages))
            if speaker.lower() not in self.stages.speakers:
                raise InvalidInput(f"unknown speaker {speaker!r}; valid speakers: "
                                   f"{', '.join(sorted(self.stages.speakers))}")
        if config.max_new_tokens < 0 or config.max_audio_frames < 0:
            raise InvalidInput("max_new_tokens and max_audio_frames must be >= 0 (0: the default)")
        return TurnRequest(
            system=config.system_prompt if config.HasField("system_prompt") else None,
            speaker=speaker, audio_output=audio_output,
            max_new_tokens=config.max_new_tokens or 1024, max_audio_frames=config.max_audio_frames or 4096,
            thinker_sampling=_sampling(config.thinker_sampling) if config.HasField("thinker_sampling")
            else SamplingParams(),
            talker_sampling=_sampling(config.talker_sampling) if config.HasField("talker_sampling") else None,
            request_id=config.request_id, session_id=config.session_id, metadata=dict(config.metadata),
        )

    async def _read_parts(self, context: grpc.aio.ServicerContext, parts: _TurnInput,
                          live: LivePrefill | None) -> bool:
        """Input parts into `parts` up to end_of_turn (True), or a cancel (False); `live` prefills them meanwhile."""
        while (msg := await self._next(context)) is not None:
            kind = msg.WhichOneof("kind")
            if kind == "end_of_turn":
                return True
            if kind == "cancel":
                return False
            if kind in (None, "config"):
                raise InvalidInput("config must be sent once, as the first message" if kind else "empty message")
            parts.add(kind, getattr(msg, kind))
            if parts.nbytes > self.max_request_bytes:
                raise ResourceExhausted(f"the turn's input passed {self.max_request_bytes} bytes, the limit")
            if live is not None:
                if live.error is not None:  # the turn so far is over a limit already
                    raise live.error
                live.update()
        raise InvalidInput("the stream ended before end_of_turn")

    async def _next(self, context: grpc.aio.ServicerContext) -> omni_pb2.ConverseRequest | None:
        """The client's next input message, within the input-idle deadline."""
        try:
            async with asyncio.timeout(self.input_idle_s):
                return await _read(context)
        except TimeoutError:
            metrics.REFUSALS.inc(reason="input_idle")
            raise DeadlineExceeded(f"no input for {self.input_idle_s:g} s before end_of_turn: send the turn's parts "
                                   "without pauses that long, then end_of_turn") from None

    async def _answer(self, outbox: _Outbox, req: TurnRequest, inbox: _Inbox,
                      t0: float, rows: MediaRows) -> TurnSummary:
        """Stream the conductor's events until its summary, or until a cancel message (a summary of the partial
        answer then). The conductor's iterator is closed before this returns."""
        progress = _Progress()
        pump = asyncio.create_task(self._pump(outbox, req, progress, rows))
        cancel = asyncio.create_task(inbox.cancelled.wait())
        try:
            pending = {pump, cancel, inbox.task}
            while not (pump.done() or cancel.done()):
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if inbox.task in done:
                    inbox.task.result()  # a message other than cancel raises; a half-close leaves the answer
            if pump.done():
                return pump.result()
        finally:
            await _finish(pump, cancel)
        return self._cancelled_summary(req, progress, t0)

    def _cancelled_summary(self, req: TurnRequest, progress: _Progress, t0: float) -> TurnSummary:
        # The conductor's record of the turn (unreleased tokens, frames not yet heard) ends with its task; the client
        # has what it was sent: the codes are those of the frames whose audio it got.
        return TurnSummary(
            text="".join(progress.texts), thinker_token_ids=progress.token_ids, codes=progress.codes,
            sample_rate=self.stages.sample_rate, num_samples=progress.num_samples,
            speaker=req.speaker.lower() if req.audio_output else None, finish_reason="cancelled",
            timings={"total_s": round(time.perf_counter() - t0, 6)}, reasoning="".join(progress.reasoning),
        )

    async def _pump(self, outbox: _Outbox, req: TurnRequest, progress: _Progress, rows: MediaRows) -> TurnSummary:
        events = self.conductor.run(req, trace_parent=_client_trace(outbox.context), rows=rows)
        try:
            async for event in events:
                if isinstance(event, TurnSummary):
                    return event
                progress.add(event)
                await outbox.write(_event_message(event))
            raise RuntimeError("the conductor ended without a summary")
        finally:
            await events.aclose()


def deployment_info(stages: Stages) -> omni_pb2.DeploymentInfo:
    """What a deployment serves: its checkpoint's variant, and speech only where it runs the Talker."""
    variant = stages.variant
    outputs = {"text": omni_pb2.MODALITY_TEXT, "audio": omni_pb2.MODALITY_AUDIO}
    return omni_pb2.DeploymentInfo(
        variant=variant.kind, model=variant.title, input_modalities=variant.input_modalities,
        output_modalities=[outputs[m] for m in stages.output_modalities], speakers=sorted(stages.speakers),
        reasoning=variant.reasoning, input_rules=variant.input_rules)


async def start_gateway(servicer: OmniServicer, address: str = "127.0.0.1:0") -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server with Omni, health and reflection (outside Ray: tests, single-process use);
    returns it and its port."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_OmniServicer_to_server(servicer, server)  # ours: an undecodable message is INVALID_ARGUMENT
    await add_standard_services(server, [SERVICE_NAMES["Omni"]])
    port = server.add_insecure_port(address)
    await server.start()
    return server, port


# ---- input assembly --------------------------------------------------------------------------------------------


@dataclass
class _Audio:
    kind: str  # "encoded" (file bytes) or "pcm16"
    sample_rate: int
    channels: int
    video_id: str
    data: bytearray = field(default_factory=bytearray)
    # PCM16 resampled as the turn's live prefills decode it (`live_view`'s copies share it): the turn's own decode at
    # its end then resamples only what came since. None: decoded whole (a format `decode_audio` refuses).
    stream: PcmStream | None = None
    view: bool = False  # a live prefill's copy: its prefix is decoded whole, and fed to the stream
    warmed: int = 0  # bytes of `data` that `warm` was given

    def decode(self) -> tuple[dict, AudioInput]:
        """The stored form (what a chat-message audio part takes: file bytes, or PCM with its rate) and the
        decoded audio; decoding the stored form later gives the same samples."""
        if self.kind == "encoded":
            raw = {"audio": bytes(self.data)} | ({"sample_rate": self.sample_rate} if self.sample_rate else {})
            return raw, decode_audio(raw["audio"], raw.get("sample_rate"))
        if self.sample_rate == 0:
            raise InvalidInput("pcm16 audio needs its sample_rate")
        if self.channels < 1:
            raise InvalidInput(f"channels must be >= 1, got {self.channels}")
        if len(self.data) % (2 * self.channels):
            raise InvalidInput(f"{len(self.data)} bytes of pcm16 is not a whole number of {self.channels}-channel "
                               "16-bit samples")
        # A view, not a copy (10 minutes' 20 MB at the turn's end): nothing appends to these bytes any more (decoded
        # at end_of_turn, or a live prefill's own copy).
        pcm = np.frombuffer(self.data, "<i2")
        pcm.flags.writeable = False
        pcm = pcm.reshape(-1, self.channels) if self.channels > 1 else pcm
        raw = {"audio": pcm, "sample_rate": self.sample_rate}
        if self.stream is None:
            return raw, decode_audio(pcm, self.sample_rate)
        if self.view:
            self.stream.feed(self.data)
            return raw, decode_audio(pcm, self.sample_rate)  # a prefix's end differs from the stream's
        return raw, self.stream.decode(self.data)

    @property
    def bytes_per_s(self) -> int:
        return 2 * max(self.channels, 1) * self.sample_rate

    def warm(self, extractor) -> float | None:
        """Resample a PCM audio still arriving, and compute its log-mel frames, up to what has come (on a worker
        thread, while the turn streams in: `services.live_input`), so that its decode at the end of the turn, and
        the processor's call, compute only what came after. Its features' level so far (`LogMelExtractor.warm`),
        or None."""
        self.stream.feed(self.data)
        return extractor.warm(self.stream.so_far()) if isinstance(extractor, LogMelExtractor) else None

    def charge(self, where: str, budget: MediaBudget) -> None:
        """Count the samples this audio decodes to against the turn's budget, from its header or byte count."""
        if self.kind == "encoded":
            budget.charge_audio_file(where, self.data)
        else:
            budget.charge_pcm(where, len(self.data), self.channels, self.sample_rate)


@dataclass
class _TurnInput:
    """A turn's input parts as they arrive, in order: a part's place is where its first chunk arrived. Consecutive
    text messages are one text part; a media part's first chunk ends it, so text may stand between media. Media
    are kept by client id; a video's sound track is part of its video."""

    order: list[tuple[str, str | int]] = field(default_factory=list)  # ("text", index) or (kind, client id)
    texts: list[list[str]] = field(default_factory=list)
    audios: dict[str, _Audio] = field(default_factory=dict)
    images: dict[str, bytearray] = field(default_factory=dict)
    videos: dict[str, tuple[list[bytes], list[float]]] = field(default_factory=dict)
    nbytes: int = 0
    budget: MediaBudget = field(default_factory=MediaBudget)  # decoded pixels and samples: checked before decoding

    def add(self, kind: str, part) -> None:
        if kind == "text":
            if self.order and self.order[-1][0] == "text":
                self.texts[-1].append(part.text)
            else:
                self.order.append(("text", len(self.texts)))
                self.texts.append([part.text])
            self.nbytes += len(part.text.encode())
        elif kind == "audio":
            if part.audio_id not in self.audios and not part.video_id:  # a track goes where its video is
                self.order.append(("audio", part.audio_id))
            self._add_audio(part)
        elif kind == "image":
            if part.image_id not in self.images:
                self.order.append(("image", part.image_id))
            self.images.setdefault(part.image_id, bytearray()).extend(part.data)
            self.nbytes += len(part.data)
        elif kind == "video_frame":
            if part.video_id not in self.videos:
                self.order.append(("video", part.video_id))
            frames, times = self.videos.setdefault(part.video_id, ([], []))
            frames.append(part.image)
            times.append(part.timestamp_s)
            self.nbytes += len(part.image)

    def _add_audio(self, part: omni_pb2.AudioInput) -> None:
        kind = part.WhichOneof("data")
        if kind is None:
            raise InvalidInput(f"audio {part.audio_id!r}: a chunk needs encoded or pcm16 data")
        audio = self.audios.get(part.audio_id)
        if audio is None:
            audio = self.audios[part.audio_id] = _Audio(kind, part.sample_rate, part.channels or 1, part.video_id)
            if kind == "pcm16" and part.sample_rate and part.channels >= 0:
                with contextlib.suppress(InvalidInput):  # decode_audio names what is wrong, at the end
                    audio.stream = PcmStream(part.sample_rate, audio.channels)
        elif (kind != audio.kind or part.sample_rate not in (0, audio.sample_rate)
              or part.channels not in (0, audio.channels) or part.video_id not in ("", audio.video_id)):
            raise InvalidInput(f"audio {part.audio_id!r}: a chunk's format, sample rate, channels or video differ "
                               "from its first chunk's")
        data = getattr(part, kind)
        audio.data.extend(data)
        self.nbytes += len(data)
        if kind == "pcm16":  # its length is known as it streams in: past the budget, the turn ends now
            probe = replace(self.budget, pixels=0, samples=0)
            for audio_id, a in self.audios.items():
                if a.kind == "pcm16":
                    _at(f"audio {audio_id!r}", a.charge, "it", probe)

    def live_progress(self, window_s: float, margin_s: float,
                      whole: bool = False) -> tuple[tuple[int, int], list, int]:
        """What of the turn so far can be prefilled while it streams in (`services.live_input`): every part but the
        last, whose chunks may still come, and the last if it is text, or PCM audio: its whole windows of `window_s`
        and `margin_s` more (`whole`: all of it that has come, once it has a whole window). Its progress (complete
        media, the last audio's whole windows), its parts and the bytes kept of that audio."""
        order, windows, cut = list(self.order), 0, 0
        if order and order[-1][0] != "text":
            kind, key = order.pop()
            audio = self.audios.get(key) if kind == "audio" else None
            if audio is not None and audio.kind == "pcm16" and audio.sample_rate > 0:
                frame = 2 * audio.channels
                windows = int((len(audio.data) // frame / audio.sample_rate - margin_s) // window_s)
                if windows > 0:
                    cut = len(audio.data) // frame * frame if whole else \
                        int((windows * window_s + margin_s) * audio.sample_rate) * frame
                    order.append((kind, key))
        media = sum(kind != "text" for kind, _ in order)
        return (media - (windows > 0), windows), order, cut

    def arriving_audio(self) -> _Audio | None:
        """The last part if it is PCM audio that a stream decodes: more of it may come."""
        if self.order and self.order[-1][0] == "audio":
            audio = self.audios[self.order[-1][1]]
            return audio if audio.stream is not None else None
        return None

    def live_view(self, window_s: float, margin_s: float,
                  whole: bool = False) -> tuple[_TurnInput, tuple[int, int]] | None:
        """A copy of `live_progress`'s parts, to decode while more input arrives, and their progress; None without
        any medium (text alone is cheap to prefill at end_of_turn)."""
        progress, order, cut = self.live_progress(window_s, margin_s, whole)
        media = {key for kind, key in order if kind != "text"}
        if not media:
            return None
        videos = {k: (list(frames), list(times)) for k, (frames, times) in self.videos.items() if k in media}
        audios = {k: replace(a, data=a.data[:cut] if cut and k == order[-1][1] else bytearray(a.data), view=True)
                  for k, a in self.audios.items() if k in media or a.video_id in videos}
        view = _TurnInput(order=order, texts=[list(t) for t in self.texts], audios=audios,
                          images={k: bytearray(v) for k, v in self.images.items() if k in media}, videos=videos,
                          nbytes=self.nbytes, budget=replace(self.budget, pixels=0, samples=0))
        return view, progress

    def request(self, options: TurnRequest, history: list[dict]) -> tuple[TurnRequest, dict]:
        """Decode the media (CPU work: run in a thread) into the TurnRequest's parts, and the user message to store
        in the session: the same parts in the same order, in the chat-message format of `build_turn`'s history,
        media as the client sent them. Every input is charged against the turn's media budget first, from headers:
        nothing is decoded when the turn would pass it."""
        self._charge()
        tracks = self._tracks()
        parts, stored = [], []
        for kind, key in self.order:
            if kind == "text":
                text = "".join(self.texts[key])
                if text.strip():  # blank text is left out of the prompt (services.turn_parts)
                    parts.append(text_part(text))
                    stored.append(text_part(text))
            elif kind == "audio":
                raw, decoded = _at(f"audio {key!r}", self.audios[key].decode)
                parts.append(audio_part(decoded))
                stored.append({"type": "audio", **raw})
            elif kind == "image":
                data = bytes(self.images[key])  # one copy, for the turn and the session
                parts.append(image_part(data))
                stored.append(image_part(data))
            else:
                frames, times = self.videos[key]
                raw, decoded = tracks.get(key, ({}, None))
                parts.append(video_part(_at(f"video {key!r}", load_video, frames, times, decoded,
                                            target_pixels=self.budget.frame_target)))
                video = {"frames": frames, "timestamps": times}
                if raw:
                    video["audio"] = raw["audio"]
                    if "sample_rate" in raw:
                        video["audio_sample_rate"] = raw["sample_rate"]
                stored.append(video_part(video))
        return replace(options, parts=parts, history=history), {"role": "user", "content": stored}

    def _tracks(self) -> dict[str, tuple[dict, AudioInput]]:
        """The videos' sound tracks, decoded: video id -> (stored form, audio)."""
        tracks: dict[str, tuple[dict, AudioInput]] = {}
        for audio_id, audio in self.audios.items():
            if not audio.video_id:
                continue
            if audio.video_id not in self.videos:
                raise InvalidInput(f"audio {audio_id!r} is the track of video {audio.video_id!r}, which has no frames")
            if audio.video_id in tracks:
                raise InvalidInput(f"video {audio.video_id!r} has more than one audio track")
            tracks[audio.video_id] = _at(f"audio {audio_id!r}", audio.decode)
        return tracks

    def _charge(self) -> None:
        for audio_id, audio in self.audios.items():
            _at(f"audio {audio_id!r}", audio.charge, "it", self.budget)
        for image_id, data in self.images.items():
            _at(f"image {image_id!r}", self.budget.charge_image, "it", data)
        for video_id, (frames, _) in self.videos.items():
            for i, frame in enumerate(frames):
                _at(f"video {video_id!r} frame {i}", self.budget.charge_image, "it", frame, frame=True)


# What any config may ask for, checked when it arrives (`_check_config_limits`): past these a turn could only fail
# later, after its upload. Qwen3-Omni's Thinker and Talker hold 65536 positions (max_position_embeddings), prompt
# included, so no answer can be longer.
MAX_NEW_TOKENS = 65536
MAX_AUDIO_FRAMES = 65536
MAX_REQUEST_ID_CHARS = 256
MAX_METADATA_ENTRIES, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 128, 1024


def _check_config_limits(config: omni_pb2.ConverseConfig) -> None:
    """Refuse a config that passes a fixed limit, before the turn starts and before any upload."""
    check_session_id(config.session_id)
    if len(config.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(f"request_id is {len(config.request_id)} characters, the limit is {MAX_REQUEST_ID_CHARS}")
    for name, value, limit, what in (
            ("max_new_tokens", config.max_new_tokens, MAX_NEW_TOKENS, "the Thinker's positions"),
            ("max_audio_frames", config.max_audio_frames, MAX_AUDIO_FRAMES, "the Talker's positions")):
        if value > limit:
            raise InvalidInput(f"{name} is {value}, more than {what} can ever hold ({limit}); ask for at most "
                               f"{limit}, or 0 for the default")
    if len(config.metadata) > MAX_METADATA_ENTRIES:
        raise InvalidInput(f"metadata has {len(config.metadata)} entries, the limit is {MAX_METADATA_ENTRIES}")
    for key, value in config.metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS or len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidInput(f"metadata entry {key[:40]!r}: keys may have {MAX_METADATA_KEY_CHARS} characters and "
                               f"values {MAX_METADATA_VALUE_CHARS}, this one {len(key)} and {len(value)}")


def _at(where: str, fn, *args, **kwargs):
    """Call a decoder; prefix its domain error with which input it was."""
    try:
        return fn(*args, **kwargs)
    except (InvalidInput, ResourceExhausted) as e:
        raise type(e)(f"{where}: {e}") from e


def _sampling(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(**{f: getattr(p, f) for f in _SAMPLING_FIELDS if p.HasField(f)})


def _client_trace(context) -> object | None:
    """The client's trace context (W3C `traceparent` metadata), unless one is current already: Serve's tracing
    continues it in its proxy and replica spans, and the turn's span belongs under those."""
    if otel_trace.get_current_span().get_span_context().is_valid:
        return None
    return tracing.extract(context.invocation_metadata() or ())


# ---- output ----------------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """What the client has been sent so far: the summary of a cancelled turn."""

    texts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    num_samples: int = 0
    codes: list[list[int]] = field(default_factory=list)  # the frames of the audio sent

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.texts.append(event.text)
            self.token_ids.extend(event.token_ids)
        elif isinstance(event, ReasoningDelta):
            self.reasoning.append(event.text)
            self.token_ids.extend(event.token_ids)
        elif isinstance(event, AudioChunk):
            self.num_samples += len(event.samples)
            self.codes.extend(list(frame) for frame in event.codes)


def _event_message(event: TextDelta | ReasoningDelta | AudioChunk | HookEvent) -> omni_pb2.ConverseResponse:
    if isinstance(event, TextDelta):
        return omni_pb2.ConverseResponse(text=omni_pb2.TextDelta(text=event.text, token_ids=event.token_ids))
    if isinstance(event, ReasoningDelta):
        return omni_pb2.ConverseResponse(reasoning=omni_pb2.ReasoningDelta(text=event.text,
                                                                           token_ids=event.token_ids))
    if isinstance(event, HookEvent):
        return omni_pb2.ConverseResponse(hook_event=hook_event_to_proto(event))
    return omni_pb2.ConverseResponse(audio=omni_pb2.AudioChunk(seq=event.seq, pcm16=event.pcm16,
                                                               sample_rate=event.sample_rate))


def _summary_message(s: TurnSummary) -> omni_pb2.ConverseResponse:
    return omni_pb2.ConverseResponse(summary=omni_pb2.TurnSummary(
        text=s.text, thinker_token_ids=s.thinker_token_ids, codes=[common_pb2.CodecFrame(codes=f) for f in s.codes],
        sample_rate=s.sample_rate, num_samples=s.num_samples, speaker=s.speaker or "",
        finish_reason=_FINISH[s.finish_reason], timings=s.timings, reasoning=s.reasoning,
    ))


# ---- stream plumbing -------------------------------------------------------------------------------------------


async def _read(context: grpc.aio.ServicerContext) -> omni_pb2.ConverseRequest | None:
    msg = await context.read()
    if isinstance(msg, Undecodable):  # services.wire.omni_api's deserializer
        raise InvalidInput(msg.reason)
    return None if msg is grpc.aio.EOF else msg


async def _refuse(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End a call before its turn: after the client's first message (its config) has arrived, or a moment, since
    ending it during that write would turn the client's write into INTERNAL (grpc/grpc#36066)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(REFUSE_READ_S):
            await context.read()
    await context.abort(code, details)


async def _drain(context: grpc.aio.ServicerContext) -> None:
    """Read and drop the rest of a failed turn's input, up to its end: ending the call while the client still
    writes would turn its write into INTERNAL instead of this call's status (grpc.aio, grpc/grpc#36066)."""
    while (msg := await _read(context)) is not None and msg.WhichOneof("kind") not in ("end_of_turn", "cancel"):
        pass


class _Inbox:
    """The client's messages after end_of_turn: a cancel (the only one allowed there), then its half-close."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self.cancelled = asyncio.Event()
        self.task = asyncio.create_task(self._read(context))

    async def _read(self, context: grpc.aio.ServicerContext) -> None:
        while (msg := await _read(context)) is not None:
            if (kind := msg.WhichOneof("kind")) != "cancel":
                raise InvalidInput(f"{kind or 'an empty message'} after end_of_turn: only cancel may follow it")
            self.cancelled.set()


class _Outbox:
    """The turn's answer messages, written one at a time. A cancel stops the pump while its write may still wait
    for the client's flow-control window; that write goes on (the summary counts its frame as sent), and the
    summary's write waits for it: two sends at once fail the call (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS)."""

    def __init__(self, context: grpc.aio.ServicerContext):
        self.context = context
        self._last: asyncio.Future | None = None

    async def write(self, msg: omni_pb2.ConverseResponse) -> None:
        if self._last is not None:
            await asyncio.shield(self._last)
        self._last = asyncio.ensure_future(self.context.write(msg))
        # A write that nobody awaits any more (its pump was cancelled, then the call failed) logs no stray error.
        self._last.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._last)


async def _finish(*tasks: asyncio.Task) -> None:
    """Cancel the tasks and wait until their cleanup has run (the conductor closes every stage's stream)."""
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a finished task's error was raised already, or is moot after cancel
