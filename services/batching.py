"""A step scheduler for a stage whose requests' items can share one engine call (DESIGN.md section 7).

Concurrent requests `submit` items; one loop per stage takes every item that is ready (up to `max_batch`) and runs
them as one engine step on the stage's worker thread, then hands each request its result. Items that arrive while
a step runs wait for the next one, so under load batches fill by themselves; `max_wait_s` can hold a step back a
little for the requests in progress (`member`) whose items are not there yet, e.g. the Talker's requests, whose
MTP results come back one by one, or prompts still starting beside the ones waiting. A request that gives up
(cancelled, its client gone) is dropped before the next step and never holds a row. A caller with a long job in
pieces on the same worker (a prompt's prefill chunks) calls `make_way` between them, so that the requests in
progress step between its pieces.

    batcher = StepBatcher("mtp", run_rows, max_batch=32)   # run_rows(list of items) -> list of results, in order
    result = await batcher.submit(item)

Items of different sizes (prompt chunks, padded to the longest in one forward) can be held to a budget: with
`max_tokens` and `tokens(item)`, a step takes items while their count times the largest item's tokens fits (the first
always), so a step of prompts costs no more than one chunk; another batcher's `worker` (its stage's) can run them.

Each step is one span ("<stage>.step") linked to the span of every request in it, and records the real batch size
(`omni_stage_batch_size`, and `omni_stage_batch_rows_total` for an exact mean), the step's time
(`omni_stage_step_seconds`) and each item's wait for its step (`omni_stage_queue_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from services import tracing
from services.metrics import STAGE_BATCH, STAGE_QUEUE, STAGE_ROWS, STAGE_STEP
from services.workers import on_worker


@dataclass
class _Waiting:
    item: Any
    future: asyncio.Future
    span: trace.SpanContext = trace.INVALID_SPAN_CONTEXT
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class _Lane:
    waiting: deque[_Waiting] = field(default_factory=deque)
    task: asyncio.Task | None = None  # the loop's steps, while items wait
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set by each submit
    handed: int = 0  # steps handed to the worker so far
    handing: asyncio.Event = field(default_factory=asyncio.Event)  # set (and replaced) at each hand-off


class StepBatcher:
    def __init__(self, stage: str, run: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 32,
                 max_wait_s: float = 0.0, worker: str | None = None, max_tokens: int | None = None,
                 tokens: Callable[[Any], int] | None = None):
        """`stage`: the metrics' and spans' name, and the worker thread's unless `worker` names another."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.stage, self.run, self.max_batch, self.max_wait_s = stage, run, max_batch, max_wait_s
        self.worker = worker or stage
        self.max_tokens, self.tokens = max_tokens, tokens
        self._members = 0  # requests in progress (`member`); none: a step waits for a full batch
        # One lane per event loop (a replica has one; a test or `omni generate` may run several in turn): futures
        # and tasks belong to the loop they were made in. Steps of every lane share the stage's worker thread.
        self._lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane] = weakref.WeakKeyDictionary()

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        """A request in progress on the stage, which will submit items step after step: a step waits up to
        `max_wait_s` for the items of all members, and not at all once they are all there."""
        self._members += 1
        try:
            yield
        finally:
            self._members -= 1

    def handed(self) -> int:
        """Steps handed to the worker so far in this event loop: `make_way`'s mark."""
        lane = self._lanes.get(asyncio.get_running_loop())
        return lane.handed if lane is not None else 0

    async def make_way(self, since: int, timeout_s: float) -> None:
        """Between two jobs of one caller on the stage's worker (a long prompt's chunks): let the requests in
        progress take a step first. Returns at once when a step was handed to the worker since `since` (a
        `handed()` taken when the caller's last job was queued: the worker runs jobs in turn, so that step goes
        first) or no request is in progress; else when the next step is handed, or after `timeout_s` (a request in
        progress may be waiting on something else). Without it, a request queues its next step a few event-loop
        turns after its last one, and a short chunk that ends first lets the next chunk go ahead of it."""
        lane = self._lanes.get(asyncio.get_running_loop())
        if not self._members or lane is None or lane.handed > since:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lane.handing.wait(), timeout_s)

    async def submit(self, item: Any, span: trace.Span | None = None) -> Any:
        """The item's result, once a step has run it; the step's error if it failed. `span`: the request's, which
        the step links to (default: the current one)."""
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(loop)
        if lane is None:
            lane = self._lanes[loop] = _Lane()
        future = loop.create_future()
        lane.waiting.append(_Waiting(item, future, span=(span or trace.get_current_span()).get_span_context()))
        lane.arrived.set()
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._steps(lane), name=f"omni-{self.stage}-steps")
        return await future

    async def _steps(self, lane: _Lane) -> None:
        """Steps while items wait; then the task ends (an idle stage holds no task), and the next submit starts
        another."""
        while lane.waiting:
            if self.max_wait_s:
                await self._gather(lane)
            if batch := self._take(lane):
                lane.handed += 1
                lane.handing.set()  # `make_way` waiters wake once `_step` below has queued the step on the worker
                lane.handing = asyncio.Event()
                await self._step(batch)

    async def _gather(self, lane: _Lane) -> None:
        """Wait up to max_wait_s for the items of every member in this step (a request whose previous
        result has just arrived sends its next item a moment later)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(lane.waiting) < min(self.max_batch, self._members or self.max_batch):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            lane.arrived.clear()
            try:
                await asyncio.wait_for(lane.arrived.wait(), remaining)
            except TimeoutError:
                return

    def _take(self, lane: _Lane) -> list[_Waiting]:
        batch, widest = [], 0
        while lane.waiting and len(batch) < self.max_batch:
            if lane.waiting[0].future.done():  # a cancelled request is dropped here
                lane.waiting.popleft()
                continue
            if self.max_tokens is not None:  # padded to the widest item: does the next one fit?
                wider = max(widest, self.tokens(lane.waiting[0].item))
                if batch and (len(batch) + 1) * wider > self.max_tokens:
                    break
                widest = wider
            batch.append(lane.waiting.popleft())
        return batch

    async def _step(self, batch: list[_Waiting]) -> None:
        started = time.perf_counter()
        for waiting in batch:
            STAGE_QUEUE.observe(started - waiting.submitted, stage=self.stage)
        STAGE_BATCH.observe(len(batch), stage=self.stage)
        STAGE_ROWS.inc(len(batch), stage=self.stage)
        span = self._step_span(batch)
        try:
            results = await on_worker(self.worker, self._timed_run, [w.item for w in batch])
        except Exception as e:  # every request in the step gets the step's error
            tracing.end_span(span, e)
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(e)
            return
        span.end()
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.future.done():
                waiting.future.set_result(result)

    def _timed_run(self, items: list) -> Sequence[Any]:
        started = time.perf_counter()
        try:
            return self.run(items)
        finally:
            STAGE_STEP.observe(time.perf_counter() - started, stage=self.stage)

    def _step_span(self, batch: list[_Waiting]) -> trace.Span:
        """The step's span: in the trace of its first sampled request (a step of unsampled requests records
        nothing), linked to every request's span."""
        sampled = [w.span for w in batch if w.span.is_valid and w.span.trace_flags.sampled]
        if not sampled:
            return trace.INVALID_SPAN
        parent = trace.set_span_in_context(trace.NonRecordingSpan(sampled[0]), otel_context.Context())
        return tracing.tracer().start_span(
            f"{self.stage}.step", context=parent, links=[trace.Link(w.span) for w in batch if w.span.is_valid],
            attributes={"omni.stage": self.stage, "omni.batch_size": len(batch), "omni.replica": tracing.replica()})
