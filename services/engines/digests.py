"""Content digests of the processor's tensors, each hashed once while it keeps coming back.

A turn's prompt is rendered again at every live prefill and at its end (`services.live_input`), and a session's at
every turn, so the same audio windows and images come back in new tensors. Hashing them all again (SHA-256, about
1.8 GB/s here) was 5 ms of the end of a 120 s turn, growing with the audio. A tensor seen lately is found by a
sample of its values and proven equal to the new one with `torch.equal` (a memory compare, about ten times the
hash's speed), and its digest is the one computed before: exact, as a hash of the new tensor would be.

    digest = TENSOR_DIGESTS.digest(features[:, 0:800])   # bytes; equal contents, equal digests
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch
from torch import Tensor

MAX_BYTES = 128 * 2**20  # tensors kept per process (2.7 hours of audio windows)
PER_KEY = 4  # tensors kept per sample of values (equal samples, other contents: a compare each)
_INTS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class TensorDigests:
    """SHA-256 of tensors' contents (dtype and shape included); the tensors seen lately kept as copies, least
    recently used out first. Thread-safe."""

    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.hashed = self.reused = 0  # digests computed, digests found again
        self._seen: OrderedDict[tuple, list[tuple[Tensor, bytes]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def digest(self, t: Tensor) -> bytes:
        dtype, shape = t.dtype, tuple(t.shape)
        t = _bits(t.detach().cpu())
        key = (dtype, shape, _sample(t))
        with self._lock:
            candidates = list(self._seen.get(key, ()))
            if candidates:
                self._seen.move_to_end(key)
        for seen, digest in reversed(candidates):
            if torch.equal(seen, t):
                self.reused += 1
                return digest
        h = hashlib.sha256(f"{dtype} {shape}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy())
        digest = h.digest()
        self.hashed += 1
        self._keep(key, t.clone(), digest)  # a copy: no later write to `t` can change what it proves
        return digest

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _keep(self, key: tuple, t: Tensor, digest: bytes) -> None:
        size = _size(t)
        if size > self.max_bytes:
            return
        with self._lock:
            group = self._seen.setdefault(key, [])
            group.append((t, digest))
            self._bytes += size
            if len(group) > PER_KEY:
                self._bytes -= _size(group.pop(0)[0])
            self._seen.move_to_end(key)
            while self._bytes > self.max_bytes:
                oldest = next(iter(self._seen))
                group = self._seen[oldest]
                self._bytes -= _size(group.pop(0)[0])
                if not group:
                    del self._seen[oldest]


def _size(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _bits(t: Tensor) -> Tensor:
    """`t` as integers of its element size (its bits: -0.0 is not 0.0, a NaN equals itself; integers compare
    4-8 times as fast as bytes), a view where `t` is contiguous along its last dimension."""
    if t.dim() == 0 or t.stride(-1) != 1:
        t = t.contiguous().view(-1) if t.dim() == 0 else t.contiguous()
    return t.view(_INTS.get(t.element_size(), torch.uint8))


def _sample(t: Tensor) -> bytes:
    """About 9 bytes along each dimension: with dtype and shape, what finds the candidates to compare."""
    picked = t[tuple(slice(None, None, max(1, n // 8)) for n in t.shape)]
    return picked.contiguous().numpy().tobytes()


TENSOR_DIGESTS = TensorDigests()
