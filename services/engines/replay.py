"""Engine steps recorded once and replayed without the GIL (MTP's frames, Code2Wav's steady frames).

An engine step at small widths is hundreds of small torch ops, each a Python call holding the GIL between them.
Where several stages step at once in one process (in process, the Talker, MTP, Code2Wav and the Thinker on every
frame's path), each waits for the others' Python between its own ops: MTP's frame of 8 took 7.9 ms alone and 21 ms
beside a thread stepping Code2Wav (one thread each, tiny checkpoint). `torch.jit.trace` records the ops of one call
with fixed shapes, and TorchScript's interpreter replays them with the GIL released: 4.0 ms alone, 4.3 ms beside.

The replay runs unoptimized (no profiling executor, hence no fusion on any device): the same aten calls on the
same tensors, so the same bits as the eager call (the engines' tests compare them). Tensors the traced function
reads but does not take as inputs (weights, preallocated caches, tables made beforehand) are kept as they are, by
reference: an engine traces only what stays fixed for a shape. TorchScript is deprecated in favour of torch.compile
and torch.export; neither replays ops as they are (torch.compile fuses them, other bits; an exported program runs
from Python), so this keeps it, and where tracing fails (a torch without it) the engine runs its steps eagerly.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Set once for the process, not around each trace: `warnings.catch_warnings` is not thread-safe, and stages trace on
# their own worker threads. A trace turns shapes into constants, which is the point (one per shape): TracerWarning
# says so at each, and only tracing raises it. TorchScript's deprecation is answered above (a decode step's trace
# calls one scripted function: `services.engines.kv_pages`).
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
warnings.filterwarnings("ignore", message="`torch.jit.(trace|script)` is deprecated", category=FutureWarning)


class Replays:
    """`fn`'s traces by key (a shape, typically), each made at the key's first call with that call's inputs."""

    def __init__(self, what: str, fn: Callable, enabled: bool = True):
        self.what, self.fn = what, fn
        self._traces: dict = {}
        self.enabled = enabled  # False: every call runs `fn` eagerly (turned off, or torch.jit.trace failed)

    def traced(self) -> set:
        """The keys replayed from a trace so far."""
        return set(self._traces)

    def __call__(self, key, *inputs: torch.Tensor):
        trace = self._traces.get(key)
        if trace is None and self.enabled:
            trace = self._trace(key, inputs)
        if trace is None:
            return self.fn(*inputs)
        with torch.jit.optimized_execution(False):
            return trace(*inputs)

    def _trace(self, key, inputs: tuple):
        try:
            trace = torch.jit.trace(self.fn, inputs, check_trace=False)
        except Exception as e:  # its message may hold a whole tensor: the first line says what failed
            message = str(e)
            reason = message.splitlines()[0][:200] if message else type(e).__name__
            log.warning("%s: torch.jit.trace failed (%s); its steps run eagerly", self.what, reason)
            self.enabled = False
            return None
        self._traces[key] = trace
        return trace
