"""The streaming conductor: one conversation turn through the stage engines, in one process.

    preprocess -> audio/vision encoders -> Thinker prefill, decode ──tokens──> hook ──released──> Talker ─┐
                                                  │                                                      │
                                             TextDelta                       Code2Wav <──codes── MTP <──┘
                                                                                 │
                                                                            AudioChunk

The Thinker, the Talker (with MTP) and Code2Wav run as concurrent asyncio tasks whose torch work runs in worker
threads, joined by bounded queues. The Talker starts with the Thinker's first released token and takes exactly one
released token per frame, waiting when it is ahead of the text: that wait is what keeps streaming output equal to
the reference `generate`, which sees the whole text up front. Every wait has a deadline. Cancelling the consumer
cancels all stages after their current step (one frame's work) and frees their state.

This event model is what the disaggregated deployment carries over gRPC; only the transport changes there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import suppress
from dataclasses import dataclass, field

import torch

from services.engines.bundle import Engines
from services.engines.sampling import Sampler, SamplingParams
from services.engines.talker import TEXT_END, TalkerPrompt, default_talker_sampling
from services.engines.thinker import ThinkerPrompt
from services.errors import DeadlineExceeded, InvalidInput
from services.events import AudioChunk, Event, TextDelta, TurnSummary
from services.hooks import IdentityHook, TextHook
from services.preprocess import TurnInputs, build_turn
from services.text import Detokenizer

log = logging.getLogger(__name__)

_END = object()  # end-of-stream marker on the inner queues


@dataclass
class TurnRequest:
    """One user turn plus the options that shape the answer."""

    text: str | None = None
    audios: Sequence = ()  # paths, encoded bytes, or (array, sample_rate) pairs; resampled to 16 kHz
    images: Sequence = ()  # paths, encoded bytes or PIL images
    videos: Sequence = ()  # services.preprocess.VideoInput
    history: Sequence[dict] = ()  # earlier turns, chat-message format
    system: str | None = None  # the Thinker's system prompt
    speaker: str = "ethan"
    audio_output: bool = True
    max_new_tokens: int = 1024
    max_audio_frames: int = 4096  # the Talker's cap, as the reference's talker_max_new_tokens
    thinker_sampling: SamplingParams = field(default_factory=SamplingParams)
    talker_sampling: SamplingParams | None = None  # None: the reference's Talker defaults


@dataclass
class _Turn:
    """Mutable per-turn bookkeeping shared by the stage tasks."""

    t0: float
    inputs: TurnInputs | None = None
    mm_hidden: torch.Tensor | None = None
    token_ids: list[int] = field(default_factory=list)
    codes: list[list[int]] = field(default_factory=list)
    num_samples: int = 0
    finish_reason: str = "stop"
    text: str = ""
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, key: str, since: float | None = None) -> None:
        """Record a duration once: from `since` (or the turn start) to now."""
        if key not in self.marks:
            self.marks[key] = time.perf_counter() - (self.t0 if since is None else since)


class Conductor:
    def __init__(self, engines: Engines, *, queue_size: int = 16, stage_timeout_s: float = 300.0,
                 hook_factory=IdentityHook):
        self.engines = engines
        self.queue_size = queue_size
        self.stage_timeout_s = stage_timeout_s
        self.hook_factory: type[TextHook] = hook_factory

    async def run(self, req: TurnRequest) -> AsyncIterator[Event]:
        """Stream a turn's events; the last one is the TurnSummary. Closing the iterator cancels the turn."""
        self._validate(req)
        turn = _Turn(t0=time.perf_counter())
        out: asyncio.Queue = asyncio.Queue(self.queue_size)
        task = asyncio.create_task(self._conduct(req, turn, out))
        try:
            while (item := await out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
            yield self._summary(req, turn)
        finally:
            if not task.done():
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task

    def _validate(self, req: TurnRequest) -> None:
        if req.max_new_tokens < 1:
            raise InvalidInput(f"max_new_tokens must be at least 1, got {req.max_new_tokens}")
        if req.max_audio_frames < 1:
            raise InvalidInput(f"max_audio_frames must be at least 1, got {req.max_audio_frames}")
        if req.audio_output:
            if self.engines.talker is None:
                raise InvalidInput("this deployment was loaded without audio output; ask for text only")
            self.engines.talker.speaker_id(req.speaker)  # unknown speaker: InvalidInput before any work

    async def _conduct(self, req: TurnRequest, turn: _Turn, out: asyncio.Queue) -> None:
        try:
            prompt = await self._prepare(req, turn)
            released: asyncio.Queue = asyncio.Queue(req.max_new_tokens + 2)  # bounded by the answer length
            frames: asyncio.Queue = asyncio.Queue(self.queue_size)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._think(req, turn, prompt, released, out))
                if req.audio_output:
                    tg.create_task(self._talk(req, turn, released, frames))
                    tg.create_task(self._vocode(turn, frames, out))
            turn.mark("total")
            await out.put(_END)
        except asyncio.CancelledError:
            turn.finish_reason = "cancelled"
            raise
        except BaseException as e:  # surfaced to the consumer by run()
            if isinstance(e, BaseExceptionGroup):
                e = e.exceptions[0]
            await out.put(e)

    async def _prepare(self, req: TurnRequest, turn: _Turn) -> ThinkerPrompt:
        eng = self.engines
        turn.inputs = inputs = await asyncio.to_thread(
            build_turn, eng.processor, history=list(req.history), system=req.system, text=req.text,
            audios=req.audios, images=req.images, videos=req.videos,
        )
        turn.mark("preprocess")
        po = inputs.processor_outputs
        prompt = ThinkerPrompt(input_ids=po["input_ids"][0], use_audio_in_video=bool(po.get("use_audio_in_video")))

        async def encode_audio():
            t = time.perf_counter()
            prompt.audio_embeds = await asyncio.to_thread(
                eng.audio.encode, po["input_features"], po["feature_attention_mask"])
            prompt.audio_feature_lengths = po["feature_attention_mask"].sum(-1)
            turn.mark("audio_encoder_ttft", t)

        async def encode_vision(kind: str, pixels: str, grid: str):
            t = time.perf_counter()
            setattr(prompt, kind, await asyncio.to_thread(eng.vision.encode, po[pixels], po[grid]))
            setattr(prompt, f"{kind}_grid_thw", po[grid])
            turn.mark("vision_encoder_ttft", t)

        async with asyncio.TaskGroup() as tg:
            if "input_features" in po:
                tg.create_task(encode_audio())
            if "pixel_values" in po:
                tg.create_task(encode_vision("image", "pixel_values", "image_grid_thw"))
            if "pixel_values_videos" in po:
                tg.create_task(encode_vision("video", "pixel_values_videos", "video_grid_thw"))
        if "video_second_per_grid" in po:
            prompt.video_second_per_grid = torch.as_tensor(po["video_second_per_grid"])
        turn.mark("encoders")
        return prompt

    async def _think(self, req: TurnRequest, turn: _Turn, prompt: ThinkerPrompt,
                     released: asyncio.Queue, out: asyncio.Queue) -> None:
        thinker = self.engines.thinker
        hook = self.hook_factory()
        detok = Detokenizer(self.engines.processor.tokenizer)
        sampler = Sampler(req.thinker_sampling)
        t_start = time.perf_counter()
        session, prefill = await asyncio.to_thread(thinker.prefill, prompt, req.max_new_tokens)
        try:
            turn.mm_hidden = prefill.mm_hidden
            logits = prefill.logits
            turn.finish_reason = "length"
            for step in range(req.max_new_tokens):
                token = sampler(logits)
                turn.token_ids.append(token)
                turn.mark("thinker_ttft", t_start)
                turn.mark("time_to_first_text")
                last = token in self.engines.thinker_stop_ids or step + 1 == req.max_new_tokens
                await self._release(hook.feed(token), detok, out, released if req.audio_output else None,
                                    withhold=token if last else None)
                if token in self.engines.thinker_stop_ids:
                    turn.finish_reason = "stop"
                    break
                if not last:
                    logits = await asyncio.to_thread(thinker.decode, session, token)
            await self._release(hook.finish(), detok, out, released if req.audio_output else None)
            turn.text = detok.text
            if req.audio_output:
                await released.put(_END)
        finally:
            session.close()

    async def _release(self, ids: list[int], detok: Detokenizer, out: asyncio.Queue,
                       talker_queue: asyncio.Queue | None, withhold: int | None = None) -> None:
        """Released tokens go to the client as text and to the Talker as speech.

        The reference Talker speaks a token only once the Thinker has fed it back (its embedding comes from the
        Thinker's input at the next step), so the Thinker's last token, its stop token or the one at the
        max_new_tokens cap, is never spoken: `withhold` keeps it from the Talker."""
        if not ids:
            return
        if talker_queue is not None:
            spoken = ids[:-1] if withhold is not None and ids[-1] == withhold else ids
            for i in spoken:
                await talker_queue.put(i)
        if delta := detok.push(ids):
            await out.put(TextDelta(text=delta, token_ids=tuple(ids)))

    async def _talk(self, req: TurnRequest, turn: _Turn, released: asyncio.Queue, frames: asyncio.Queue) -> None:
        talker, mtp = self.engines.talker, self.engines.mtp
        sampling = req.talker_sampling or default_talker_sampling(
            greedy=req.thinker_sampling.greedy, seed=req.thinker_sampling.seed)
        generator = None if sampling.greedy else torch.Generator().manual_seed(sampling.seed or 0)
        first = await self._get(released, "talker")
        if first is _END:  # nothing was released: nothing to say
            await frames.put(_END)
            return
        po = turn.inputs.processor_outputs
        prompt = TalkerPrompt(
            input_ids=po["input_ids"][0], mm_hidden=turn.mm_hidden, speaker=req.speaker,
            audio_feature_lengths=po["feature_attention_mask"].sum(-1) if "feature_attention_mask" in po else None,
            image_grid_thw=po.get("image_grid_thw"), video_grid_thw=po.get("video_grid_thw"),
            video_second_per_grid=(torch.as_tensor(po["video_second_per_grid"])
                                   if "video_second_per_grid" in po else None),
            use_audio_in_video=bool(po.get("use_audio_in_video")),
        )
        t_start = time.perf_counter()
        session, frame = await asyncio.to_thread(
            talker.prefill, prompt, first, sampling, req.max_audio_frames)
        turn.mark("talker_ttft", t_start)
        try:
            text_ended = False
            # The reference's frame accounting: a frame's residual codes come from the step after its c0, so the
            # last c0 (EOS, or the one that hits the cap) has no frame.
            generated = 1
            while frame.c0 != talker.codec_eos_id and generated < req.max_audio_frames:
                t_mtp = time.perf_counter()
                result = await asyncio.to_thread(
                    mtp.predict, frame.hidden[None], torch.tensor([frame.c0]), sampling.greedy, generator)
                turn.mark("mtp_ttft", t_mtp)
                codes = result.codes[0]
                turn.codes.append(codes.tolist())
                await self._put(frames, codes, "code2wav")
                token = TEXT_END
                if not text_ended:
                    token = await self._get(released, "talker")
                    if token is _END:
                        text_ended, token = True, TEXT_END
                frame = await asyncio.to_thread(talker.step, session, result.embed_sum[0], token)
                generated += 1
        finally:
            session.close()
        await frames.put(_END)

    async def _vocode(self, turn: _Turn, frames: asyncio.Queue, out: asyncio.Queue) -> None:
        code2wav = self.engines.code2wav
        stream = code2wav.stream()
        seq = 0

        async def emit(samples: torch.Tensor) -> None:
            nonlocal seq
            if samples.numel() == 0:
                return
            turn.mark("time_to_first_audio")
            turn.num_samples += samples.numel()
            await out.put(AudioChunk(seq=seq, samples=samples.float().cpu().numpy(), sample_rate=code2wav.sample_rate))
            seq += 1

        while (codes := await self._get(frames, "code2wav")) is not _END:
            t = time.perf_counter()
            samples = await asyncio.to_thread(stream.push, codes[None])
            turn.mark("code2wav_ttft", t)
            await emit(samples)
        await emit(await asyncio.to_thread(stream.finish))

    async def _get(self, queue: asyncio.Queue, stage: str):
        try:
            async with asyncio.timeout(self.stage_timeout_s):
                return await queue.get()
        except TimeoutError:
            raise DeadlineExceeded(f"{stage} waited more than {self.stage_timeout_s:g} s for its input") from None

    async def _put(self, queue: asyncio.Queue, item, stage: str) -> None:
        try:
            async with asyncio.timeout(self.stage_timeout_s):
                await queue.put(item)
        except TimeoutError:
            raise DeadlineExceeded(f"{stage} did not take its input within {self.stage_timeout_s:g} s") from None

    def _summary(self, req: TurnRequest, turn: _Turn) -> TurnSummary:
        sample_rate = self.engines.code2wav.sample_rate if self.engines.code2wav else 24000
        audio_s = turn.num_samples / sample_rate
        timings = {f"{k}_s": round(v, 6) for k, v in turn.marks.items()}
        timings["audio_s"] = round(audio_s, 6)
        if audio_s > 0:
            timings["rtf"] = round(turn.marks["total"] / audio_s, 6)
        return TurnSummary(
            text=turn.text, thinker_token_ids=list(turn.token_ids), codes=turn.codes, sample_rate=sample_rate,
            num_samples=turn.num_samples, speaker=req.speaker if req.audio_output else None,
            finish_reason=turn.finish_reason, timings=timings,
        )
