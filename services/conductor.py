"""The streaming conductor: one conversation turn through the stages.

    preprocess -> audio/vision encoders -> Thinker ──tokens──> hook ──released──> Talker (+MTP) ──frames──> Code2Wav
                                                                 │                                             │
                                                  TextDelta, ReasoningDelta                               AudioChunk

The Thinker, the Talker and Code2Wav run as concurrent asyncio tasks joined by bounded queues. The Talker starts
with the first released token and takes exactly one released token per frame, waiting when it is ahead of the
text: that wait is what keeps streaming output equal to the reference `generate`, which sees the whole text up
front. Every wait has a deadline. Closing the event iterator cancels every stage after its current step (one
frame's work) and frees its state.

Stages are `services.stages` objects: in-process engines (`Stages.local`) or gRPC clients in the deployment; the
conducting logic and the events are the same. What a turn may ask for follows the checkpoint's variant
(`Stages.variant`): audio out only with a Talker, and the Captioner's one audio and nothing else. A Thinking
model's reasoning streams as ReasoningDelta events and never reaches the Talker.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace

import torch
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace

from services import tracing
from services.engines.kv_pages import KEEP_NONE, KEEP_SESSION, KEEP_TURN
from services.engines.positions import layout_of
from services.engines.sampling import SamplingParams
from services.engines.talker import TalkerPrompt, default_talker_sampling
from services.engines.thinker import ThinkerPrompt
from services.errors import DeadlineExceeded, InvalidInput
from services.events import AudioChunk, Event, ReasoningDelta, TextDelta, TurnSummary
from services.hooks import FilterChain, HookContext, HookStage, HookTurn, LocalHooks, Released
from services.metrics import record_turn
from services.preprocess import TurnInputs, build_turn
from services.prompt_media import PromptMedia
from services.stages import Codes, Stages
from services.turn_parts import kind_counts

log = logging.getLogger(__name__)

_END = object()  # end-of-stream marker on the inner queues
HOOK_LATE = "no answer from the hook stage within {s} s"


@dataclass
class TurnRequest:
    """One user turn plus the options that shape the answer."""

    # The turn's content parts in the order the user gave them (`services.turn_parts`: chat-message content dicts
    # of text, audio, image, video); the prompt renders them in this order.
    parts: Sequence[dict] = ()
    history: Sequence[dict] = ()  # earlier turns, chat-message format
    system: str | None = None  # the Thinker's system prompt
    speaker: str = "ethan"
    audio_output: bool = True
    max_new_tokens: int = 1024
    max_audio_frames: int = 4096  # the Talker's cap, as the reference's talker_max_new_tokens
    thinker_sampling: SamplingParams = field(default_factory=SamplingParams)
    talker_sampling: SamplingParams | None = None  # None: the reference's Talker defaults
    request_id: str = ""  # for logs, traces and the hooks' context
    session_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)  # the client's, passed to the text filters
    principal: str = ""  # the authenticated tenant (services.auth): logs, traces, the text filters' context


@dataclass(eq=False)
class MediaRows:
    """A turn's `mm_hidden` (the Thinker's hidden states at its media placeholders: the Talker's input), kept
    across the turn's calls, its live prefills and its answer (`services.live_input`). A call asks the Thinker only
    for the rows past those held (`ThinkerPrompt.hidden_from`) and tells the Talker which its replica holds already
    (`TalkerPrompt.mm_from`), so each row crosses the wire about once per turn, not once per prefill: at the end of a
    long audio only its last window's rows do."""

    rows: torch.Tensor | None = None  # [N, D] of placeholders 0..N-1 of the latest prompt
    talker_has: int = 0  # rows whose inputs the Talker replica kept (the turn's last prefill), under `tag`
    thinker_ids: torch.Tensor | None = None  # the prompt the Thinker replica kept (the turn's last prefill)
    tag: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def held(self) -> int:
        return 0 if self.rows is None else len(self.rows)

    def update(self, mm_from: int, new: torch.Tensor) -> None:
        """The Thinker's rows from placeholder `mm_from` on (those before it are unchanged)."""
        self.rows = new if self.rows is None or mm_from == 0 else torch.cat((self.rows[:mm_from], new))
        self.talker_has = min(self.talker_has, mm_from)


@dataclass
class _Turn:
    """Per-turn bookkeeping shared by the stage tasks."""

    t0: float
    rows: MediaRows = field(default_factory=MediaRows)  # the Thinker's prefill output the Talker takes
    token_ids: list[int] = field(default_factory=list)
    codes: list[list[int]] = field(default_factory=list)
    num_samples: int = 0
    finish_reason: str = "length"  # "stop", "length", "blocked" or "cancelled"
    text: str = ""
    reasoning: str = ""
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, key: str, since: float | None = None) -> None:
        """Record a duration once: from `since` (or the turn start) to now."""
        if key not in self.marks:
            self.marks[key] = time.perf_counter() - (self.t0 if since is None else since)


class Conductor:
    def __init__(self, stages: Stages, *, hooks: FilterChain | HookStage | None = None, queue_size: int = 16,
                 stage_timeout_s: float = 300.0):
        """`hooks`: a chain to run in this process, or the hook stage (e.g. `RoutedHooks`, the hooks
        application); None: the empty chain, which releases every token as it is."""
        self.stages = stages
        tracing.setup()  # a no-op unless OTEL_* ask for traces, or where Serve's tracing runs already
        if hooks is None or isinstance(hooks, FilterChain):
            hooks = LocalHooks(hooks or FilterChain([]), stages.processor)
        self.hooks = hooks
        self.queue_size = queue_size
        self.stage_timeout_s = stage_timeout_s

    async def run(self, req: TurnRequest, trace_parent: otel_context.Context | None = None,
                  rows: MediaRows | None = None) -> AsyncIterator[Event]:
        """Stream a turn's events; the last one is the TurnSummary. Closing the iterator cancels the turn.

        The turn is one trace (`services.tracing`): its span is the child of `trace_parent` (a client's context)
        or of the current one, and every stage call runs in its context, with the turn's request id. `rows`: what
        the turn's live prefills (`prefill`) left."""
        self._validate(req)
        req = _seeded(req)
        turn = _Turn(t0=time.perf_counter(), rows=rows or MediaRows())
        out: asyncio.Queue = asyncio.Queue(self.queue_size)
        parent = tracing.turn_context(req.session_id, trace_parent)
        span = tracing.start_span("omni.turn", ctx=parent, request_id=req.request_id,
                                  **({"omni.principal": req.principal} if req.principal else {}))
        ctx = contextvars.copy_context()  # the stage tasks' context; this generator's caller keeps its own
        ctx.run(otel_context.attach, otel_trace.set_span_in_context(span, parent))
        ctx.run(tracing.REQUEST_ID.set, req.request_id)
        task = asyncio.create_task(self._conduct(req, turn, out), context=ctx)
        error = None
        try:
            while (item := await out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
            summary = self._summary(req, turn)
            span.set_attributes({"omni.frames": len(summary.codes), "omni.tokens": len(summary.thinker_token_ids),
                                 **{f"omni.{k}": v for k, v in summary.timings.items() if k.startswith("time_to_")}})
            yield summary
        except Exception as e:
            error = e
            raise
        finally:
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            span.set_attribute("omni.finish_reason", turn.finish_reason)
            tracing.end_span(span, error)

    def _validate(self, req: TurnRequest) -> None:
        if req.max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be at least 1, got {req.max_new_tokens}")
        if req.max_audio_frames < 1:
            raise InvalidInput(f"max_audio_frames must be at least 1, got {req.max_audio_frames}")
        if req.audio_output:
            if self.stages.talker is None:
                raise InvalidInput(text_only_message(self.stages))
            if req.speaker.lower() not in self.stages.speakers:
                raise InvalidInput(f"unknown speaker {req.speaker!r}; valid speakers: "
                                   f"{', '.join(sorted(self.stages.speakers))}")
        if self.stages.variant.kind == "captioner":
            _check_caption_request(req, self.stages.variant)

    async def _conduct(self, req: TurnRequest, turn: _Turn, out: asyncio.Queue) -> None:
        try:
            media, inputs = await self._prepare(req, turn)
            released: asyncio.Queue = asyncio.Queue(req.max_new_tokens + 1)  # bounded by the answer length
            frames: asyncio.Queue = asyncio.Queue(self.queue_size)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._think(req, turn, media, inputs, released, out))
                if req.audio_output:
                    tg.create_task(self._talk(req, turn, media.prompt, released, frames))
                    tg.create_task(self._vocode(turn, frames, out))
            turn.mark("total")
            await out.put(_END)
        except asyncio.CancelledError:
            turn.finish_reason = "cancelled"
            raise
        except BaseException as e:  # surfaced to the consumer by run()
            while isinstance(e, BaseExceptionGroup):
                e = e.exceptions[0]
            await out.put(e)

    async def prefill(self, req: TurnRequest, rows: MediaRows) -> int:
        """Prefill the turn as it stands into the Thinker, and its user parts into the Talker when it is to be
        spoken, its input still streaming in (`services.live_input`): each replica keeps the KV under the turn's key
        for the next call, this turn's answer (`run`) included, which then prefills only what came since, or
        changed; `rows` keeps the turn's `mm_hidden` for them. Returns the prompt's length."""
        tracing.REQUEST_ID.set(req.request_id)
        # A session's key keeps the session's place (its next turn may be this one); a turn's own, the first to go.
        keep = KEEP_SESSION if req.session_id else KEEP_TURN
        media, _ = await self._prepare(req, _Turn(t0=time.perf_counter(), rows=rows), keep=keep)
        media.prompt.hidden_from = rows.held
        rows.thinker_ids = None  # until it has kept this prompt
        tokens = self.stages.thinker.generate(media.prompt, req.thinker_sampling, 0, self.stages.stop_ids,
                                              embed=media.embedder)
        async for item in self._deadline(tokens, "thinker"):
            if item.mm_hidden is not None:
                rows.update(item.mm_from, item.mm_hidden)
        rows.thinker_ids = media.prompt.input_ids
        if req.audio_output and self.stages.talker is not None:  # the Talker: its user parts, from mm_hidden
            prompt = _talker_prompt(req, media.prompt, rows, keep)
            rows.talker_has = 0  # until it has kept them again
            async for _ in self._deadline(self.stages.talker.speak(prompt, _talker_sampling(req), 0, _nothing()),
                                          "talker"):
                pass
            rows.talker_has = rows.held
        return media.prompt.input_ids.numel()

    async def _prepare(self, req: TurnRequest, turn: _Turn, keep: str | None = None) -> tuple[PromptMedia, TurnInputs]:
        st = self.stages
        # The Captioner's prompt is the audio alone: no tools are declared to it.
        tools = None if st.variant.kind == "captioner" else await self.hooks.tool_schemas()
        inputs = await asyncio.to_thread(
            build_turn, st.processor, history=list(req.history), system=req.system, parts=list(req.parts),
            tools=tools,
        )
        turn.mark("preprocess")
        # The Thinker replica keeps a session's KV between its turns, and the turn's media are encoded when the
        # Thinker asks for those past what it holds, or before, where the turn's live prefill says which.
        keep = keep or (KEEP_SESSION if req.session_id else KEEP_NONE)
        media = await PromptMedia.of(st, inputs.processor_outputs, held=turn.rows.thinker_ids,
                                     cache_key=cache_key(req), keep=keep, mark=turn.mark)
        return media, inputs

    async def _think(self, req: TurnRequest, turn: _Turn, media: PromptMedia, inputs: TurnInputs,
                     released: asyncio.Queue, out: asyncio.Queue) -> None:
        ctx = HookContext(request_id=req.request_id, session_id=req.session_id, conversation=inputs.messages,
                          metadata=req.metadata, principal=req.principal)
        talker_queue = released if req.audio_output else None
        async with self.hooks.open(ctx) as hook:
            while True:
                generated, stopped = await self._think_once(req, turn, media, hook, out, talker_queue)
                if turn.finish_reason == "blocked":  # the fallback is released; the hook has ended the text
                    break
                r = await self._within(hook.thinker_end(stopped), HOOK_LATE)
                await self._release(r, turn, out, talker_queue)
                if r.resume is None:
                    break
                # The Thinker called tools (never released, so never heard): it goes on with their results after
                # its own tokens. Same media, so the same encoder outputs.
                prompt = media.prompt
                prompt.input_ids = torch.cat([prompt.input_ids, torch.tensor([*generated, *r.resume],
                                                                             dtype=prompt.input_ids.dtype)])
        if talker_queue is not None:
            await talker_queue.put(_END)

    async def _think_once(self, req: TurnRequest, turn: _Turn, media: PromptMedia, hook: HookTurn,
                          out: asyncio.Queue, talker_queue: asyncio.Queue | None) -> tuple[list[int], bool]:
        """One Thinker generation through the hook: the ids it wrote (its stop token included) and whether it
        stopped at its stop token."""
        stop_ids = self.stages.stop_ids
        step_ids = []
        t_start = time.perf_counter()
        media.prompt.hidden_from = turn.rows.held
        tokens = self.stages.thinker.generate(media.prompt, req.thinker_sampling, req.max_new_tokens, stop_ids,
                                              embed=media.embedder)
        async for item in self._deadline(tokens, "thinker"):
            if item.mm_hidden is not None:  # the Talker's multimodal input, with the first token
                turn.rows.update(item.mm_from, item.mm_hidden)
            turn.token_ids.append(item.token_id)
            step_ids.append(item.token_id)
            turn.mark("thinker_ttft", t_start)
            if item.token_id in stop_ids:  # never text, never spoken
                turn.finish_reason = "stop"
                return step_ids, True
            turn.finish_reason = "length"
            at_cap = len(step_ids) == req.max_new_tokens
            r = await self._within(hook.feed(item.token_id), HOOK_LATE)
            await self._release(r, turn, out, talker_queue, withhold=item.token_id if at_cap else None)
            if r.stop:  # a filter blocked the rest: the fallback is already released
                turn.finish_reason = "blocked"
                break
        return step_ids, False

    async def _release(self, r: Released, turn: _Turn, out: asyncio.Queue, talker_queue: asyncio.Queue | None,
                       withhold: int | None = None) -> None:
        """Released tokens go to the Talker as speech and, as the same text, to the client.

        The reference Talker speaks a token only once the Thinker has fed it back (its embedding comes from the
        Thinker's input at the next step), so the Thinker's last token, its stop token or the one at the
        max_new_tokens cap, is never spoken: `withhold` keeps the latter from the Talker."""
        for event in r.events:
            await out.put(event)
        if r.reasoning:  # shown apart, never spoken
            turn.mark("time_to_first_reasoning")
            turn.reasoning += r.reasoning
            await out.put(ReasoningDelta(text=r.reasoning, token_ids=tuple(r.reasoning_ids)))
        ids = r.token_ids[:-1] if withhold is not None and r.token_ids[-1:] == [withhold] else r.token_ids
        if talker_queue is not None:
            for i in ids:
                await talker_queue.put(i)
        if r.text:
            turn.mark("time_to_first_text")
            turn.text += r.text
            await out.put(TextDelta(text=r.text, token_ids=tuple(r.token_ids)))

    async def _talk(self, req: TurnRequest, turn: _Turn, thinker_prompt: ThinkerPrompt,
                    released: asyncio.Queue, frames: asyncio.Queue) -> None:
        sampling = _talker_sampling(req)

        async def text():
            while (token := await self._get(released, "talker")) is not _END:
                yield token

        text_stream = text()
        first = await anext(text_stream, None)  # the Talker needs the Thinker's prefill (mm_hidden) first
        if first is None:
            await frames.put(_END)
            return

        async def text_from_first():
            yield first
            async for token in text_stream:
                yield token

        # The KV of a session's user parts stays on the replica for its next turn; this turn's own is freed.
        prompt = _talker_prompt(req, thinker_prompt, turn.rows, KEEP_SESSION if req.session_id else KEEP_NONE)
        t_start = time.perf_counter()
        codes_stream = self.stages.talker.speak(prompt, sampling, req.max_audio_frames, text_from_first())
        async for codes in self._deadline(codes_stream, "talker"):
            turn.mark("talker_ttft", t_start)
            turn.codes.append(list(codes))
            await self._put(frames, codes, "code2wav")
        await frames.put(_END)

    async def _vocode(self, turn: _Turn, frames: asyncio.Queue, out: asyncio.Queue) -> None:
        handed: list[Codes] = []  # frames given to Code2Wav since the last packet

        async def frame_stream():
            while (codes := await self._get(frames, "code2wav")) is not _END:
                handed.append(codes)
                yield codes

        t_start = time.perf_counter()
        seq = 0
        async for samples in self._deadline(self.stages.code2wav.decode(frame_stream()), "code2wav"):
            turn.mark("code2wav_ttft", t_start)
            turn.mark("time_to_first_audio")
            turn.num_samples += samples.numel()
            chunk = AudioChunk(seq=seq, samples=samples.float().cpu().numpy(), sample_rate=self.stages.sample_rate,
                               codes=tuple(handed))
            handed.clear()
            await self._put(out, chunk, "client")
            seq += 1

    async def _deadline(self, stream: AsyncIterator, stage: str) -> AsyncIterator:
        """Iterate a stage's output with a deadline on every item; close the stage's stream on exit."""
        it = aiter(stream)
        try:
            while True:
                try:
                    item = await self._within(anext(it), f"no output from the {stage} within {{s}} s")
                except StopAsyncIteration:
                    return
                yield item
        finally:
            await it.aclose()

    async def _get(self, queue: asyncio.Queue, stage: str):
        return await self._within(queue.get(), f"the {stage} waited more than {{s}} s for its input")

    async def _put(self, queue: asyncio.Queue, item, consumer: str) -> None:
        await self._within(queue.put(item), f"the {consumer} did not take its input within {{s}} s")

    async def _within(self, awaitable: Awaitable, late: str):
        """`awaitable`'s result, or DeadlineExceeded after stage_timeout_s; `late` says what did not happen in
        "{s}" seconds."""
        try:
            async with asyncio.timeout(self.stage_timeout_s):
                return await awaitable
        except TimeoutError:
            raise DeadlineExceeded(late.format(s=f"{self.stage_timeout_s:g}")) from None

    def _summary(self, req: TurnRequest, turn: _Turn) -> TurnSummary:
        audio_s = turn.num_samples / self.stages.sample_rate
        timings = {f"{k}_s": round(v, 6) for k, v in turn.marks.items()}
        timings["audio_s"] = round(audio_s, 6)
        if audio_s > 0:
            timings["rtf"] = round(turn.marks["total"] / audio_s, 6)
        record_turn(timings)
        return TurnSummary(
            text=turn.text, thinker_token_ids=list(turn.token_ids), codes=turn.codes,
            sample_rate=self.stages.sample_rate, num_samples=turn.num_samples,
            speaker=req.speaker.lower() if req.audio_output else None, finish_reason=turn.finish_reason,
            timings=timings, reasoning=turn.reasoning,
        )


def cache_key(req: TurnRequest) -> str:
    """Where the Thinker replica keeps a turn's KV (`services.engines.prefix`): its session's, or the turn's own
    while its input streams in; its principal's either way (no one else's prompt is compared with it)."""
    if req.session_id:
        return f"{req.principal}/session/{req.session_id}"
    return f"{req.principal}/turn/{req.request_id}" if req.request_id else ""


def _talker_prompt(req: TurnRequest, thinker_prompt: ThinkerPrompt, rows: MediaRows, keep: str) -> TalkerPrompt:
    """The Talker's prompt: the Thinker prompt's layout, its media's hidden states (and which of them the Talker
    replica holds already), and the Thinker's cache key."""
    return TalkerPrompt(**layout_of(thinker_prompt), mm_hidden=rows.rows, speaker=req.speaker,
                        cache_key=thinker_prompt.cache_key, keep=keep, mm_from=rows.talker_has, rows_tag=rows.tag)


def _talker_sampling(req: TurnRequest) -> SamplingParams:
    """The client's, else the reference's Talker defaults, greedy when the Thinker is."""
    return req.talker_sampling or default_talker_sampling(greedy=req.thinker_sampling.greedy,
                                                          seed=req.thinker_sampling.seed)


async def _nothing() -> AsyncIterator[int]:
    """No released text: a prefill only."""
    return
    yield


def _seeded(req: TurnRequest) -> TurnRequest:
    """`req` with a random seed for each sampled stage that has none: the same draws as unseeded, and a turn that a
    stage replica's death interrupts can be computed again on another exactly (`services.serving.resume`)."""
    thinker, talker = req.thinker_sampling, req.talker_sampling
    if not thinker.greedy and thinker.seed is None:
        thinker = replace(thinker, seed=secrets.randbits(63))
    if talker is not None and not talker.greedy and talker.seed is None:
        talker = replace(talker, seed=secrets.randbits(63))
    return replace(req, thinker_sampling=thinker, talker_sampling=talker)


def text_only_message(stages: Stages) -> str:
    """Why a deployment refuses audio output, naming the model."""
    variant = stages.variant
    why = "the checkpoint has no Talker" if not variant.speech else "it runs without the Talker and Code2Wav stages"
    return f"this deployment of {variant.title} serves text only ({why}); ask for text output"


def _check_caption_request(req: TurnRequest, variant) -> None:
    """The Captioner was trained on one audio and nothing else: refuse what it would answer untrained."""
    counts = kind_counts(req.parts)
    extra = []
    if counts["audio"] != 1:
        extra.append(f"{counts['audio']} audios")
    if counts["text"]:
        extra.append("text")
    if counts["image"]:
        extra.append("images")
    if counts["video"]:
        extra.append("videos")
    if req.system is not None:
        extra.append("a system prompt")
    if req.history:
        extra.append("earlier turns")
    if extra:
        raise InvalidInput(f"{variant.title} takes {variant.input_rules}; this request has {', '.join(extra)}")
