"""Stage interfaces at stream granularity, and their in-process implementations over the engines.

The conductor talks to stages only through these calls, so the same conducting code runs in one process (the
`Local*` classes here, engine steps in worker threads) and across machines (gRPC clients with the same methods).
Each call is one request's stream: the Thinker streams tokens, the Talker turns a stream of released text tokens
into a stream of 16-code frames (calling MTP itself every frame), Code2Wav turns frames into PCM.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from services import tracing
from services.batching import StepBatcher
from services.checkpoint.variant import INSTRUCT, Variant
from services.config import CODE2WAV_BATCH_WAIT_MS, TALKER_BATCH_WAIT_MS, THINKER_BATCH_WAIT_MS
from services.engines.audio_encoder import AudioEncoderEngine
from services.engines.code2wav import Code2WavEngine, push_batch
from services.engines.mtp import MTPEngine, MTPResult
from services.engines.prefix import AudioWindow
from services.engines.sampling import Sampler, SamplingParams
from services.engines.talker import TEXT_END, TalkerEngine, TalkerPrompt
from services.engines.thinker import ThinkerEngine, ThinkerPrompt
from services.engines.vision_encoder import VisionEmbeddings, VisionEncoderEngine
from services.metrics import PREFIX_REDOS, PREFIX_TOKENS, STAGE_QUEUE, StageTimer
from services.workers import on_worker, share_cores


Codes = tuple[int, ...]  # one 80 ms frame: codebook 0 (the Talker's) then the 15 residual codebooks (MTP's)


@dataclass(frozen=True)
class ThinkerToken:
    token_id: int | None  # None: the one item of a prefill only (max_new_tokens 0), which carries mm_hidden
    # With the first item only: the Talker's multimodal input, the rows of the placeholders from `mm_from` on (the
    # prompt's `hidden_from`, or where the prefix the Thinker reused ends if that is earlier).
    mm_hidden: Tensor | None = None
    mm_from: int = 0


class AudioEncoderStage(Protocol):
    async def encode(self, input_features: Tensor, feature_attention_mask: Tensor) -> Tensor: ...


class VisionEncoderStage(Protocol):
    async def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> VisionEmbeddings: ...


Embed = Callable[[int], Awaitable[ThinkerPrompt]]  # `PromptMedia.embed`: the prompt with its media from token N on


class ThinkerStage(Protocol):
    def generate(self, prompt: ThinkerPrompt, sampling: SamplingParams, max_new_tokens: int,
                 stop_ids: frozenset[int], embed: Embed | None = None) -> AsyncIterator[ThinkerToken]:
        """Sampled tokens until a stop id (yielded) or max_new_tokens; max_new_tokens 0: prefill only, whose one
        item has no token. With `embed`, `prompt` is the layout alone and the stage asks `embed` for the embeddings
        past the prefix it holds for `prompt.cache_key`."""


class MTPStage(Protocol):
    async def predict(self, hidden: Tensor, c0: Tensor, greedy: bool, seed: int | None) -> MTPResult: ...


class TalkerStage(Protocol):
    def speak(self, prompt: TalkerPrompt, sampling: SamplingParams, max_frames: int,
              text: AsyncIterator[int]) -> AsyncIterator[Codes]:
        """Frames of 16 codes; `text` yields released token ids, the first one starts the Talker, its end is the
        end of text. Frame accounting follows the reference: `max_frames` is its talker_max_new_tokens. max_frames
        0: prefill only the prompt's user parts, kept for its cache key (`prompt.keep`), and speak nothing."""


class Code2WavStage(Protocol):
    def decode(self, frames: AsyncIterator[Codes]) -> AsyncIterator[Tensor]:
        """PCM samples (float32, 24 kHz) as soon as causality allows, then the tail after the last frame."""


def mtp_seed(seed: int | None, frame: int) -> int | None:
    """MTP keeps no state across frames, so a sampled request's draws are seeded per frame: the same request seed
    gives the same codes whichever MTP replica serves each frame."""
    return None if seed is None else (seed * 1_000_003 + frame) % 2**63


async def run_engine(stage: str, fn, *args):
    """Run one engine call on the stage's worker thread, recording how long it queued for it."""
    submitted = time.perf_counter()

    def call():
        STAGE_QUEUE.observe(time.perf_counter() - submitted, stage=stage)
        return fn(*args)

    return await on_worker(stage, call)


async def start_job(stage: str, start, *args):
    """`start(*args)` (an engine's `start`: it takes KV pages) on the stage's worker thread. A caller cancelled
    meanwhile does not get the job, so the job's session is closed when the call ends, and its pages go back."""
    call = asyncio.ensure_future(run_engine(stage, start, *args))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        call.add_done_callback(lambda done: done.cancelled() or done.exception() or done.result().session.close())
        raise


# How long a prompt's next chunk waits for the decoding requests to queue their step first (`StepBatcher.make_way`):
# they do within a few event-loop turns; one that waits on something else holds the prompt up no longer than this.
MAKE_WAY_S = 0.005


async def prefill_in_chunks(batcher: StepBatcher, prefill_chunk, job, finished):
    """`await prefill_chunk(job)` (one chunk of a prompt, on the stage's worker) until `finished(its result)`;
    between chunks, the requests in progress on `batcher` take a step first. Returns the last chunk's result (None:
    no chunk ran)."""
    result, handed = None, None
    while not finished(result):
        if handed is not None:
            await batcher.make_way(handed, MAKE_WAY_S)
        handed = batcher.handed()
        result = await prefill_chunk(job)
    return result


def prompt_batcher(stage: str, engine: ThinkerEngine | TalkerEngine, max_batch: int, max_wait_s: float) -> StepBatcher:
    """The stage's prompt chunks, on its worker: those that wait together run as one forward (the engine's
    `prefill_batch`, padded to the longest), while their count times the longest fits one `prefill_chunk`. A step
    waits up to `max_wait_s` for the chunks of the prompts that are starting (its `member`s): turns that arrive
    together prefill together, and reach the next stage together."""
    chunk = engine.prefill_chunk

    def tokens(job) -> int:
        a, b = job.next_chunk(chunk)
        return b - a

    return StepBatcher(f"{stage}_prefill", engine.prefill_batch, max_batch=max_batch, max_wait_s=max_wait_s,
                       worker=stage, max_tokens=chunk, tokens=tokens)


async def prefill_chunk(prefills: StepBatcher, job):
    """The job's next chunk, in a step with the chunks of the prompts waiting beside it (an engine's
    `prefill_batch`, which gives a job's own error as its result)."""
    result = await prefills.submit(job)
    if isinstance(result, Exception):
        raise result
    return result


async def timed_call(stage: str, fn, *args, first: bool = True):
    """One engine call that is a whole request's output (encoders; MTP's frames, of which only a request's first
    counts as its first output)."""
    with StageTimer(stage, first=first) as timer:
        out = await run_engine(stage, fn, *args)
        timer.output()
    return out


class LocalAudioEncoder:
    def __init__(self, engine: AudioEncoderEngine):
        self.engine = engine

    async def encode(self, input_features: Tensor, feature_attention_mask: Tensor) -> Tensor:
        return await timed_call("audio_encoder", self.engine.encode, input_features, feature_attention_mask)


class LocalVisionEncoder:
    def __init__(self, engine: VisionEncoderEngine):
        self.engine = engine

    async def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> VisionEmbeddings:
        return await timed_call("vision_encoder", self.engine.encode, pixel_values, grid_thw)


class LocalThinker:
    """Each call is one request's generation. Its prompt prefills in chunks on the stage's worker thread, between
    the decode steps of the requests already running, each chunk in one forward with the chunks of the prompts
    waiting beside it; its decode steps join theirs (`services.batching`), each request sampled by its own
    sampler. A request with a cache key starts from the KV this replica kept under it (only past the prefix proven
    equal: `services.engines.prefix`), asks `embed` for the media past that, and leaves its own KV there when it
    ends (`ThinkerPrompt.keep`); one cancelled mid-step frees it."""

    def __init__(self, engine: ThinkerEngine, max_batch: int = 64, max_wait_s: float = THINKER_BATCH_WAIT_MS / 1000):
        self.engine = engine
        self._batcher = StepBatcher("thinker", self._decode_rows, max_batch=max_batch, max_wait_s=max_wait_s)
        self._prefills = prompt_batcher("thinker", engine, max_batch, max_wait_s)

    async def generate(self, prompt: ThinkerPrompt, sampling: SamplingParams, max_new_tokens: int,
                       stop_ids: frozenset[int], embed: Embed | None = None) -> AsyncIterator[ThinkerToken]:
        engine = self.engine
        job = decode = None
        generated: list[int] = []
        in_step = False  # an engine call for this request is running (a cancel then must not park its KV)
        with StageTimer("thinker") as timer:
            try:
                span = tracing.start_span("thinker.prefill", parent=timer.span,
                                          prompt_tokens=int(prompt.input_ids.numel()))
                try:
                    reuse = engine.claim(prompt)
                    try:
                        if embed is not None:  # the media past the prefix this replica holds
                            prompt = await embed(reuse.tokens if reuse else 0)
                    except BaseException:
                        engine.release(reuse)
                        raise
                    reused = reuse.tokens if reuse else 0
                    span.set_attribute("omni.reused_tokens", reused)
                    if reused:
                        PREFIX_TOKENS.inc(reused, stage="thinker", kind="reused")
                    if reuse is not None and reuse.redone:
                        PREFIX_REDOS.inc()
                    PREFIX_TOKENS.inc(prompt.input_ids.numel() - reused, stage="thinker", kind="prefilled")
                    in_step = True
                    with self._prefills.member():  # its chunks: a step waits for them beside the others'
                        job = await start_job("thinker", engine.start, prompt, max_new_tokens, reuse)
                        prefill = await prefill_in_chunks(self._batcher, partial(prefill_chunk, self._prefills),
                                                          job, lambda result: result is not None)
                    in_step = False
                finally:
                    span.end()
                if not max_new_tokens:  # prefill only
                    yield ThinkerToken(None, prefill.new_hidden, prefill.mm_from)
                    return
                session = job.session
                decode = tracing.start_span("thinker.decode", parent=timer.span)
                sampler = Sampler(sampling)
                logits, mm_hidden = prefill.logits, prefill.new_hidden
                with self._batcher.member():
                    for step in range(max_new_tokens):
                        token = sampler(logits)
                        generated.append(token)
                        timer.output()
                        yield ThinkerToken(token, mm_hidden, prefill.mm_from)
                        mm_hidden = None
                        if token in stop_ids or step + 1 == max_new_tokens:
                            return
                        engine.check_decode(session, token)
                        in_step = True
                        logits = await self._batcher.submit((session, token), timer.span)
                        in_step = False
            finally:
                if decode is not None:
                    decode.set_attribute("omni.tokens", timer.items)
                    decode.end()
                if job is not None:
                    if in_step:
                        job.session.close()
                    else:  # kept for the session's next request (`services.engines.prefix`), or freed
                        engine.park(job.session, prompt, generated, prefill.mm_hidden)

    def _decode_rows(self, rows: list[tuple]) -> list[Tensor]:
        """One decode step over requests' next tokens (on the stage's worker thread)."""
        return list(self.engine.decode_batch([s for s, _ in rows], [t for _, t in rows]))


class LocalMTP:
    """Each call is frames of one request (the request id in context); the frames of concurrent requests, from
    any Talker, share engine steps (`services.batching`), each row sampled on its own. Only a request's first
    frame is its time to first output; the rest are items."""

    REMEMBERED = 4096  # requests whose first frame was seen: bounded, as MTP holds no per-request state

    def __init__(self, engine: MTPEngine, max_batch: int = 32, max_wait_s: float = 0.0):
        self.engine = engine
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._batcher = StepBatcher("mtp", self._run_rows, max_batch=max_batch, max_wait_s=max_wait_s)

    async def predict(self, hidden: Tensor, c0: Tensor, greedy: bool, seed: int | None) -> MTPResult:
        self.engine.check_frames(hidden, c0)  # here: a bad frame must not fail a whole step
        with StageTimer("mtp", first=self._first(tracing.REQUEST_ID.get())) as timer:
            rows = await asyncio.gather(*(self._batcher.submit((h, int(c), greedy, seed), timer.span)
                                          for h, c in zip(hidden, c0)))
            timer.output()
        return MTPResult(codes=torch.stack([r[0] for r in rows]), embed_sum=torch.stack([r[1] for r in rows]))

    def _run_rows(self, rows: list[tuple]) -> list[tuple[Tensor, Tensor]]:
        """One engine step over frames of any requests (on the stage's worker thread)."""
        hidden = torch.stack([h for h, _, _, _ in rows])
        c0 = torch.tensor([c for _, c, _, _ in rows])
        generators = [None if g or seed is None else torch.Generator().manual_seed(seed) for _, _, g, seed in rows]
        result = self.engine.predict(hidden, c0, [g for _, _, g, _ in rows], generators)
        return list(zip(result.codes, result.embed_sum))

    def _first(self, rid: str) -> bool:
        if not rid:
            return True
        if rid in self._seen:
            self._seen.move_to_end(rid)
            return False
        self._seen[rid] = None
        if len(self._seen) > self.REMEMBERED:
            self._seen.popitem(last=False)
        return True


class LocalTalker:
    """Each call is one request's speech. Its prompt prefills in chunks between the steps of the requests already
    speaking (with the chunks of the prompts waiting beside it), and its steps join theirs (`services.batching`); a
    request waiting for its next released text token sits the steps out. Each request samples its c0s with its own
    sampler. A session's request starts from the KV of its earlier turns' user parts, which the replica kept
    (`TalkerEngine.park`)."""

    def __init__(self, engine: TalkerEngine, mtp: MTPStage, max_batch: int = 64,
                 max_wait_s: float = TALKER_BATCH_WAIT_MS / 1000):
        self.engine = engine
        self.mtp = mtp  # the Talker calls MTP itself every frame (in process or over gRPC)
        self._batcher = StepBatcher("talker", self._step_rows, max_batch=max_batch, max_wait_s=max_wait_s)
        self._prefills = prompt_batcher("talker", engine, max_batch, max_wait_s)

    async def speak(self, prompt: TalkerPrompt, sampling: SamplingParams, max_frames: int,
                    text: AsyncIterator[int]) -> AsyncIterator[Codes]:
        text = aiter(text)
        first = None  # prefill only (max_frames 0): the user parts alone
        if max_frames and (first := await anext(text, None)) is None:  # nothing was released: nothing to say
            return
        engine = self.engine
        job = None
        in_step = True  # an engine call for this request is running (a cancel then must not park its KV)
        with StageTimer("talker") as timer:
            try:
                # The prefill and the first frame's c0 (what a turn's first audio waits for, with its MTP).
                span = tracing.start_span("talker.prefill", parent=timer.span,
                                          prompt_tokens=int(prompt.input_ids.numel()))
                try:
                    with self._prefills.member():  # its chunks: a step waits for them beside the others'
                        job = await start_job("talker", engine.start, prompt, first, sampling, max_frames)
                        session = job.session
                        reused, prefilled = session.length, len(job.embeds) - session.length
                        span.set_attribute("omni.reused_positions", reused)
                        span.set_attribute("omni.prefilled_positions", prefilled)
                        if reused:  # taken from the KV this replica kept for the key
                            PREFIX_TOKENS.inc(reused, stage="talker", kind="reused")
                        PREFIX_TOKENS.inc(prefilled, stage="talker", kind="prefilled")
                        frame = await prefill_in_chunks(self._batcher, partial(prefill_chunk, self._prefills),
                                                        job, lambda _: job.done)
                finally:
                    span.end()
                in_step = False
                if frame is None:  # prefill only: its KV is kept (below)
                    return
                text_ended = False
                # A frame's residual codes come from the step after its c0, so the last c0 (EOS, or the one that
                # hits the cap) never becomes a frame: the reference's talker_codes.
                generated = 1
                with self._batcher.member():
                    while frame.c0 != engine.codec_eos_id and generated < max_frames:
                        with tracing.current(timer.span):  # the frame's MTP span is the Talker's child
                            result = await self.mtp.predict(frame.hidden[None], torch.tensor([frame.c0]),
                                                            sampling.greedy, mtp_seed(sampling.seed, generated))
                        timer.output()
                        yield tuple(result.codes[0].tolist())  # the frame's one way out of tensors
                        token = TEXT_END
                        if not text_ended:
                            token = await anext(text, None)
                            if token is None:
                                text_ended, token = True, TEXT_END
                        engine.check_step(session, token)
                        in_step = True
                        frame = await self._batcher.submit((session, result.embed_sum[0], token), timer.span)
                        in_step = False
                        generated += 1
            finally:
                if job is not None:
                    if in_step:
                        job.session.close()
                    else:  # its user parts' KV kept for the key's next request, or freed
                        engine.park(job, prompt)

    def _step_rows(self, rows: list[tuple]) -> list:
        """One Talker step over requests' next inputs (on the stage's worker thread)."""
        return self.engine.step_batch([s for s, _, _ in rows], torch.stack([e for _, e, _ in rows]),
                                      [t for _, _, t in rows])


class LocalCode2Wav:
    """Each call is one utterance's stream. Its frames share forwards with the other streams' (`services.batching`,
    `code2wav.push_batch`), each stream with its own convolution and attention state: first frames with first
    frames (turns that start together), later ones with later ones; a push of several frames runs alone."""

    def __init__(self, engine: Code2WavEngine, max_batch: int = 64, max_wait_s: float = CODE2WAV_BATCH_WAIT_MS / 1000):
        self.engine = engine
        self._batcher = StepBatcher("code2wav", self._push_rows, max_batch=max_batch, max_wait_s=max_wait_s)

    async def decode(self, frames: AsyncIterator[Codes]) -> AsyncIterator[Tensor]:
        stream = self.engine.stream()
        with StageTimer("code2wav") as timer:
            with self._batcher.member():
                async for frame in frames:
                    codes = self.engine.check_codes(torch.tensor([frame]))  # [1, 16]: one frame per message
                    samples = await self._batcher.submit((stream, codes), timer.span)
                    if samples.numel():
                        timer.output()
                        yield samples
            tail = stream.finish()
        if tail.numel():
            yield tail

    def _push_rows(self, rows: list[tuple]) -> list[Tensor]:
        """One step over streams' next frames (on the stage's worker thread)."""
        out: list[Tensor | None] = [None] * len(rows)
        groups: dict[str, list[int]] = {}  # one forward per phase: new streams' first frames, steady streams' next
        for i, (stream, codes) in enumerate(rows):
            if codes.shape[0] == 1 and stream.phase is not None:
                groups.setdefault(stream.phase, []).append(i)
            else:
                out[i] = stream.push(codes)
        for together in groups.values():
            pushed = push_batch([rows[i][0] for i in together], torch.cat([rows[i][1] for i in together]))
            for i, samples in zip(together, pushed):
                out[i] = samples
        return out


@dataclass
class Stages:
    """Everything a conductor needs: the processor (preprocessing runs where the conductor runs), the stages, and
    the checkpoint facts that shape a turn."""

    processor: object  # transformers Qwen3OmniMoeProcessor
    audio: AudioEncoderStage
    vision: VisionEncoderStage
    thinker: ThinkerStage
    talker: TalkerStage | None  # None: text-only deployment
    code2wav: Code2WavStage | None
    speakers: dict[str, int]
    stop_ids: frozenset[int]
    sample_rate: int = 24000
    variant: Variant = INSTRUCT  # the checkpoint's: what a turn may hold, and the name errors give
    audio_window: AudioWindow = AudioWindow()  # the checkpoint's audio encoder window: a streamed audio's unit

    @property
    def output_modalities(self) -> tuple[str, ...]:
        """What this deployment answers with: the checkpoint's speech needs the Talker and Code2Wav stages too."""
        return ("text", "audio") if self.talker is not None else ("text",)

    @classmethod
    def local(cls, engines) -> "Stages":
        """In-process stages over `services.engines.bundle.Engines`, sharing the process's cores
        (`services.workers`)."""
        share_cores()
        audio_out = engines.talker is not None
        return cls(
            processor=engines.processor,
            audio=LocalAudioEncoder(engines.audio),
            vision=LocalVisionEncoder(engines.vision),
            thinker=LocalThinker(engines.thinker),
            talker=LocalTalker(engines.talker, LocalMTP(engines.mtp)) if audio_out else None,
            code2wav=LocalCode2Wav(engines.code2wav) if audio_out else None,
            speakers=engines.talker.speakers if audio_out else {},
            stop_ids=engines.thinker_stop_ids,
            sample_rate=engines.code2wav.sample_rate if audio_out else 24000,
            variant=engines.variant,
            audio_window=AudioWindow.of(engines.audio.tower.config),
        )
