"""Resuming a stage stream on another replica (`routes.ReplicaSet.stream`): what the new call is sent again, and
which of its outputs the caller already has.

A stage call is a deterministic function of what it is sent: the prompt, the sampling parameters with their seed
(the conductor seeds every sampled turn: `Conductor.run`), and its input stream (the Talker's released text,
Code2Wav's frames, the hooks' Thinker tokens). So a call whose replica died runs again from its start on a
survivor: its inputs are sent again (`Replay`), and the outputs the caller has had are checked and dropped
(`SeenItems`, `SeenSamples`), so the caller sees the stream go on where it stopped, with the same ids, codes and
samples as an undisturbed run. The survivor recomputes the turn so far: the price of exactness. Prefilling what was
generated instead would be faster on long answers but is not bit-exact (a prefill sums in another order than the
steps did) and cannot bring back a sampler's RNG state.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Generic, TypeVar

import grpc
from torch import Tensor

from services.hooks import Released
from services.servicers.status import StageError

T = TypeVar("T")
_END = object()


class Replay(Generic[T]):
    """An input stream read once from `source`, and by each consumer (`reader()`) from its start: a call resumed on
    another replica is sent everything again. A consumer cancelled mid-read (its call died) leaves the pending read
    to the next consumer, so no item is lost or read twice from the source."""

    def __init__(self, source: AsyncIterator[T]):
        self._source = aiter(source)
        self._items: list[T] = []
        self._next: asyncio.Future | None = None  # the source read in progress
        self._ended = False

    async def reader(self) -> AsyncIterator[T]:
        i = 0
        while True:
            while i < len(self._items):
                yield self._items[i]
                i += 1
            if self._ended:
                return
            if self._next is None:
                self._next = asyncio.ensure_future(self._read())
            pending = self._next
            item = await asyncio.shield(pending)  # the source's error, if it failed, for every consumer
            if self._next is pending:  # a consumer cancelled at the same moment may have taken it already
                self._next = None
                if item is _END:
                    self._ended = True
                else:
                    self._items.append(item)

    async def _read(self):
        return await anext(self._source, _END)

    async def close(self) -> None:
        if self._next is not None and not self._next.done():
            self._next.cancel()
            with suppress(asyncio.CancelledError):
                await self._next
        elif hasattr(self._source, "aclose"):
            await self._source.aclose()


class SeenItems(Generic[T]):
    """The items a stream has given its caller, by `key` (a token id, a frame's codes): a resumed call's items are
    checked against them and dropped until it is past them."""

    def __init__(self, stage: str, key: Callable[[T], Hashable]):
        self.stage, self.key = stage, key
        self.keys: list[Hashable] = []
        self.at = 0  # items of the current call so far

    def rewind(self) -> None:
        self.at = 0

    def new(self, item: T) -> T | None:
        """`item` if the caller has not had it; None if it has (then it must be the same)."""
        k = self.key(item)
        self.at += 1
        if self.at <= len(self.keys):
            if self.keys[self.at - 1] != k:
                raise diverged(self.stage, f"output {self.at - 1}")
            return None
        self.keys.append(k)
        return item


class SeenSamples:
    """The samples a Code2Wav stream has given its caller, by count: a resumed call's are dropped up to there."""

    def __init__(self):
        self.total = 0
        self.at = 0

    def rewind(self) -> None:
        self.at = 0

    def new(self, samples: Tensor) -> Tensor | None:
        n = samples.shape[-1]
        had = min(max(self.total - self.at, 0), n)
        self.at += n
        if had == n:
            return None
        self.total += n - had
        return samples[..., had:]


def past(given: Released, answer: Released, stage: str = "hooks") -> Released:
    """What `answer`, everything a resumed hook stream released for the turn's calls so far, releases beyond
    `given`, what the turn released before the replica died."""
    if answer.token_ids[:len(given.token_ids)] != given.token_ids or not answer.text.startswith(given.text):
        raise diverged(stage, "released text")
    return Released(
        token_ids=answer.token_ids[len(given.token_ids):], text=answer.text[len(given.text):],
        events=answer.events[len(given.events):], stop=answer.stop, tool_calls=answer.tool_calls[len(given.tool_calls):],
        resume=answer.resume, reasoning=answer.reasoning[len(given.reasoning):],
        reasoning_ids=answer.reasoning_ids[len(given.reasoning_ids):],
    )


def diverged(stage: str, what: str) -> StageError:
    return StageError(grpc.StatusCode.ABORTED,
                      f"{stage} stage: a replica failed mid-turn and the one that resumed the turn answered otherwise "
                      f"({what} differs), so the turn cannot go on; send it again")
