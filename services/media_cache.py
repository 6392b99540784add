"""Decoded media, by content: a session's later turns decode none of its earlier media again.

The session store keeps media compact, as the bytes the client sent (`services.sessions`), and every turn renders
the whole conversation, so without this each turn would decode and resample all of its history's media again
(10 minutes of 48 kHz audio: 0.5 s of CPU per turn, measured). Entries are keyed by a digest of the bytes and of the
decode's parameters, evicted least recently used first, and bounded in bytes; a miss costs only the decode it
would have cost anyway. One cache per process, thread-safe: `build_turn` runs in worker threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
import PIL.Image

T = TypeVar("T")
MAX_BYTES = 512 * 2**20  # decoded media kept per process


class DecodedMedia:
    def __init__(self, max_bytes: int = MAX_BYTES):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: str, source: object, params: Mapping, decode: Callable[[], T]) -> T:
        """`decode()`'s value for `source` (bytes, arrays, lists and dicts of them) decoded with `params`, from the
        cache when it holds it. The value is shared between turns: it is frozen (arrays read-only). A source that
        names a file (a path) is decoded every time: the file may change."""
        if not _by_content(source):
            return decode()
        key = _digest((kind, source, sorted(params.items())))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            self.misses += 1
        value = decode()  # outside the lock: other turns' hits need not wait for it
        size = _frozen_size(value)
        with self._lock:
            if size <= self.max_bytes and key not in self._entries:
                self._entries[key] = (value, size)
                self.nbytes += size
                while self.nbytes > self.max_bytes:
                    _, (_, evicted) = self._entries.popitem(last=False)
                    self.nbytes -= evicted
        return value


HISTORY = DecodedMedia()  # the media, given as bytes, of every turn and session history this process renders


def _by_content(x: object) -> bool:
    if isinstance(x, np.ndarray):
        return not x.dtype.hasobject  # its memory is its content
    if isinstance(x, (bytes, bytearray, memoryview, int, float)) or x is None:
        return True
    if isinstance(x, Mapping):
        return all(_by_content(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return all(_by_content(v) for v in x)
    return False  # a path, or something only its loader knows


def _digest(source: object) -> bytes:
    h = hashlib.sha256()  # with the CPU's SHA extensions, twice BLAKE2b's speed
    _feed(h, source)
    return h.digest()


def _feed(h, x: object) -> None:
    """Hash `x` with its type and length, so that different structures never give the same byte stream."""
    if isinstance(x, (bytes, bytearray, memoryview)):
        h.update(b"b%d:" % len(x))
        h.update(x)
    elif isinstance(x, np.ndarray):
        h.update(f"a{x.dtype.str}{x.shape}:".encode())
        h.update(np.ascontiguousarray(x))
    elif isinstance(x, Mapping):
        _feed(h, sorted(x.items()))
    elif isinstance(x, (list, tuple)):
        h.update(b"l%d:" % len(x))
        for item in x:
            _feed(h, item)
    else:  # numbers, None, the params' names
        r = repr(x).encode()
        h.update(b"r%d:" % len(r))
        h.update(r)


def _frozen_size(value: object) -> int:
    """The decoded bytes of `value` (arrays, PIL images, in dataclasses and lists), its arrays made read-only."""
    size = 0
    for leaf in _leaves(value):
        if isinstance(leaf, np.ndarray):
            leaf.flags.writeable = False
            size += leaf.nbytes
        elif isinstance(leaf, PIL.Image.Image):
            size += leaf.width * leaf.height * len(leaf.getbands())
    return size  # numbers and the like count nothing next to the samples and pixels


def _leaves(value: object):
    if hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _leaves(getattr(value, name))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value
