"""Live input: a turn is prefilled into the Thinker while its parts still stream in (DESIGN.md section 8).

Without it nothing runs before `end_of_turn`, so the wait after the user stops grows with what they said. Here the
gateway, as input arrives, renders the turn so far (history and the parts that are complete: every part before
the last, and of a PCM audio still streaming in its whole encoder windows) and has the Thinker prefill it, and the
Talker its user parts from the Thinker's hidden states at the media (`Conductor.prefill`); each replica keeps that KV
under the turn's cache key, and the next prefill, or the answer at `end_of_turn`, takes it back and runs only what
came since (`services.engines.prefix`, `TalkerEngine._claim`). What is left at `end_of_turn` is the last partial
window and the prompt's tail. The Thinker's hidden states at the media (`mm_hidden`, the Talker's input) stay with
the turn (`conductor.MediaRows`): each prefill asks the Thinker only for the rows past those held, and sends the
Talker only the rows past those its replica kept, so a long audio's rows cross each hop once, not at every window.

Exactness comes from the prefix check, not from here: a later prefill reuses only the ids and media windows it
proves equal. A louder moment that changes the log-mel features of earlier windows (the extractor's clamp at the
maximum over the whole audio minus 8) changes their digests, and they are prefilled again from the first changed
one: `omni_thinker_prefix_redos_total` counts those.

Between prefills, a PCM audio still arriving is resampled and its log-mel frames computed every `WARM_S` of it
(`_Audio.warm`, on a worker thread), so that `end_of_turn` does that for its last second, not its last window.
A warm-up also sees the loudest moment so far. When it is past the windows prefilled (in the audio's last, partial
window) it raises the clamp of every prefilled window, and the next window's prefill would redo them, but if the turn
ends first, its end would: all of a long audio, after the user stopped (for 120 s of speech here, 0.28 s rather than
0.07). So a rise starts a prefill of all the audio so far, its partial window too ("catching up"): the windows are
redone now, at their final clamp if no louder moment follows, and `end_of_turn` prefills only the last window.
Catch-ups are `CATCH_UP_S` of audio apart at least (a later rise waits for that), so an audio whose level keeps
rising costs a few more redos per window, not one per second.

At most one prefill of a turn runs at a time, started `debounce_s` after the input that made it worth one (a new
complete medium, or a new whole window of audio), so a turn uploaded at once (all parts, then `end_of_turn`)
costs nothing extra. At `end_of_turn` the one running is waited for (it holds one window's work at most); one not
yet started is dropped. A prefill that passes a limit (RESOURCE_EXHAUSTED: the Thinker's KV cache or sequence
limit) ends the turn at once (`error`); one that fails otherwise is logged and ends the turn's prefilling: the
answer then does it all, and reports the error if there is one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from services import metrics
from services.conductor import Conductor, MediaRows, TurnRequest
from services.errors import ResourceExhausted

log = logging.getLogger(__name__)

DEBOUNCE_S = 0.05
WARM_S = 1.0  # seconds of a streaming audio that arrive between its warm-ups
MARGIN_S = 0.1  # audio kept past a window's end: its last frames' STFT (and resampler) see real samples
CATCH_UP_S = 2.0  # seconds of audio between catch-ups (prefills of all of it after a louder moment), at least


@dataclass
class _Loudness:
    """An arriving audio's level as its warm-ups see it (`_Audio.warm`), and whether a rise waits for a catch-up."""

    audio: object
    level: float = float("-inf")  # the highest seen
    risen: bool = False  # past a whole window, since the last catch-up
    caught_up_at: float = float("-inf")  # seconds of the audio at the last catch-up


class LivePrefill:
    def __init__(self, conductor: Conductor, options: TurnRequest, history: list[dict], parts,
                 window_s: float, rows: MediaRows, debounce_s: float = DEBOUNCE_S):
        """`parts`: the turn's input as it arrives (the gateway's `_TurnInput`: `live_progress` says how far it
        can be prefilled, `live_view` copies that much, whose `request` makes the TurnRequest); `window_s`: the
        audio encoder's window in seconds; `rows`: the turn's, for its answer (`Conductor.run`) too."""
        self.conductor, self.options, self.history, self.rows = conductor, options, history, rows
        self.parts, self.window_s, self.debounce_s = parts, window_s, debounce_s
        self._done: tuple[int, int] = (0, 0)  # the progress prefilled so far
        self._task: asyncio.Task | None = None
        self._warming: asyncio.Task | None = None
        self._working = False  # the task is past its debounce: waiting for it costs less than redoing its work
        self._loudness: _Loudness | None = None  # the arriving audio's
        self._catch_up = False  # prefill all of the audio so far, next
        self._stopped = False
        self.error: ResourceExhausted | None = None  # a limit the turn passed: the gateway ends it with this

    def update(self) -> None:
        """Input has arrived: prefill it soon if it adds a complete medium or a window of audio."""
        if self._stopped:
            return
        self._warm()
        if self._task is not None and not self._task.done():
            return
        progress, _, _ = self.parts.live_progress(self.window_s, MARGIN_S)
        if (progress != self._done or self._catch_up) and progress != (0, 0):
            self._task = asyncio.create_task(self._prefills(), name="omni-live-prefill")

    def _warm(self) -> None:
        audio = self.parts.arriving_audio()
        if audio is None or (self._warming is not None and not self._warming.done()):
            return
        if len(audio.data) - audio.warmed >= WARM_S * audio.bytes_per_s:
            audio.warmed = len(audio.data)
            self._warming = asyncio.create_task(self._warm_up(audio), name="omni-live-warm")

    async def _warm_up(self, audio) -> None:
        try:
            level = await asyncio.to_thread(audio.warm, self.conductor.stages.processor.feature_extractor)
        except Exception as e:  # the turn's own decode at its end does it all, and reports a real error
            log.info("turn %s: warming its audio stopped: %s", self.options.request_id, e)
            return
        if self._loudness is None or self._loudness.audio is not audio:  # each audio is clamped at its own level
            self._loudness = _Loudness(audio)
        loud = self._loudness
        if level is not None and level > loud.level:
            loud.level = level
            # Before the first whole window the rise is its prefill's: it clamps at that window's own level.
            loud.risen = loud.risen or self.parts.live_progress(self.window_s, MARGIN_S)[0][1] > 0
        seconds = len(audio.data) / audio.bytes_per_s
        if loud.risen and seconds - loud.caught_up_at >= CATCH_UP_S and not self._stopped:
            loud.risen, loud.caught_up_at, self._catch_up = False, seconds, True
            self.update()

    async def settle(self) -> None:
        """`end_of_turn`: no more prefills; wait for the one running, drop one not started; wait for a warm-up
        (its frames are the end's to reuse)."""
        self._stopped = True
        if self._warming is not None:
            await self._warming
        if self._task is None or self._task.done():
            return
        if not self._working:
            await self.close()
            return
        with contextlib.suppress(Exception):
            await self._task

    async def close(self) -> None:
        self._stopped = True
        if self._warming is not None:
            self._warming.cancel()  # its thread runs on: nothing waits for it
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _prefills(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.debounce_s)
            catch_up, self._catch_up = self._catch_up, False
            seen = self.parts.live_view(self.window_s, MARGIN_S, whole=catch_up)
            if self._stopped or seen is None or (seen[1] == self._done and not catch_up):
                return
            snapshot, progress = seen
            if catch_up:
                metrics.LIVE_CATCH_UPS.inc()
            self._working = True
            try:
                t = time.perf_counter()
                req, _ = await asyncio.to_thread(snapshot.request, self.options, self.history)
                tokens = await self.conductor.prefill(req, self.rows)
                metrics.LIVE_PREFILLS.inc()
                log.info("turn %s: prefilled %d tokens of its input so far in %.0f ms", self.options.request_id,
                         tokens, 1000 * (time.perf_counter() - t))
                self._done = progress
            except ResourceExhausted as e:
                self.error, self._stopped = e, True
            except Exception as e:  # the answer at end_of_turn does it all, and reports a real error
                log.info("turn %s: live prefill stopped: %s", self.options.request_id, e)
                self._stopped = True
            finally:
                self._working = False
