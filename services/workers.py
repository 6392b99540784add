"""The stages' worker threads: one per stage engine in a process, so that engine steps of concurrent requests run
one at a time (as on one GPU stream) and the wait for that thread is the stage's queue time; and the cores each
computes with.

A process that hosts several stages that compute at once (in process, a spoken turn keeps the Thinker, Talker, MTP
and Code2Wav busy together: `Stages.local`) gives each worker its share of torch's threads (`share_cores`). At
torch's default, a thread per core for each, their OpenMP threads spin against each other: on 2 cores, 6 turns at
once in process made 7.0-9.7 audio s/s at 2 threads each and 15.2 at one (`omni bench load --skip-wide`), and one
turn's first audio came in 58-64 ms, not 74-81. A stage replica of its own (`serving.apps`) computes with the CPUs Ray
gave it and never shares.

    results = await on_worker("talker", engine.step_batch, sessions, embeds, tokens)
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor

import torch

CONCURRENT_ENGINES = 4  # the stages of a spoken turn that compute at once: Thinker, Talker, MTP, Code2Wav
_threads: int | None = None  # each worker's intra-op threads; None: the process's


def shared_threads() -> int:
    """Each worker's share of the calling thread's torch threads (at least one)."""
    return max(1, torch.get_num_threads() // CONCURRENT_ENGINES)


def threads_summary() -> str:
    """How many torch threads this process computes with, for the benches' headers."""
    return f"{torch.get_num_threads()} CPU threads, {shared_threads()} per stage in process"


def share_cores() -> None:
    """From now on each stage's worker computes with its share of the cores (`shared_threads`)."""
    global _threads
    _threads = shared_threads()


def on_worker(stage: str, fn, *args) -> asyncio.Future:
    """`fn(*args)` on the stage's worker thread, with its share of the cores."""
    return asyncio.get_running_loop().run_in_executor(_executor(stage), _call, fn, args)


def _call(fn, args):
    if _threads is not None and torch.get_num_threads() != _threads:
        torch.set_num_threads(_threads)  # this thread's OpenMP and MKL teams (threads that computed keep theirs)
    return fn(*args)


@functools.cache
def _executor(stage: str) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"omni-{stage}")
