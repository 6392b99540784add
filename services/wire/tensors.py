"""Tensors to and from the wire: `Tensor` messages whole, `TensorPiece` streams for anything big.

Data is the elements' raw little-endian bytes in C order (`omni/v1/tensor.proto`). Decoding shares memory with the
received bytes where it can (`torch.frombuffer`), and a piece stream is assembled into one preallocated buffer
that becomes the tensor without another copy.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from services.errors import InvalidInput, ResourceExhausted
from services.wire.gen.omni.v1.tensor_pb2 import Tensor, TensorPiece

if sys.byteorder != "little":  # the wire is little-endian and the codec copies bytes as they are
    raise ImportError("services.wire.tensors supports little-endian hosts only")
# from_proto shares the message's immutable bytes on purpose (documented there); torch warns about that once.
warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning, re.escape(__name__))

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
PIECE_BYTES = 1 << 20  # data per TensorPiece: per-message cost is noise at this size, and buffers stay small
DEFAULT_MAX_BYTES = 4 << 30  # what one PieceAssembler accepts in total unless told otherwise


class NamedTensor(NamedTuple):
    name: str
    tensor: torch.Tensor


def to_proto(t: torch.Tensor | np.ndarray) -> Tensor:
    """A whole tensor as one message (keep it well under the 8 MiB message limit; use `to_pieces` otherwise)."""
    t = _as_torch(t)
    return Tensor(dtype=_NAMES[t.dtype], shape=t.shape, data=_bytes_view(t).tobytes())


def from_proto(msg: Tensor, copy: bool = False) -> torch.Tensor:
    """The tensor of a `Tensor` message, on the CPU.

    Without `copy` it shares memory with the message's (immutable) bytes: read it, move it to a device, but do
    not modify it in place; with `copy` it owns writable memory.
    """
    dtype, shape, nbytes = _check_header(msg.dtype, msg.shape)
    data = msg.data
    if len(data) != nbytes:
        raise InvalidInput(f"tensor {msg.dtype}{list(shape)} needs {nbytes} bytes, got {len(data)}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if copy or nbytes == 1:  # CPython shares 1-byte bytes objects process-wide: never alias those
        data = bytearray(data)
    flat = torch.frombuffer(data, dtype=torch.uint8)
    return _finish(flat, dtype, shape, f"tensor {msg.dtype}{list(shape)}")


def to_pieces(name: str, t: torch.Tensor | np.ndarray, piece_bytes: int = PIECE_BYTES) -> Iterator[TensorPiece]:
    """Stream a tensor of any size as pieces of at most `piece_bytes` data (one piece when it is empty)."""
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be positive, got {piece_bytes}")
    t = _as_torch(t)
    data = _bytes_view(t)
    dtype, shape, total = _NAMES[t.dtype], list(t.shape), data.shape[0]
    offset = 0
    while True:
        end = min(offset + piece_bytes, total)
        yield TensorPiece(name=name, dtype=dtype, shape=shape, offset=offset, data=data[offset:end].tobytes(),
                          last=end == total)
        if end == total:
            return
        offset = end


class PieceAssembler:
    """Rebuilds the tensors of one stream of `TensorPiece`s, checking every piece against the first one.

    Each tensor's buffer is allocated once from its declared dtype and shape; a declaration that would take the
    stream past `max_bytes` in total raises ResourceExhausted before any of it is allocated. A malformed stream
    (unknown dtype, offsets out of order, more or fewer bytes than declared, a piece of another tensor before the
    current one is complete) raises InvalidInput.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.total_bytes = 0  # declared bytes of every tensor started so far
        self._current: _Partial | None = None

    def add(self, piece: TensorPiece) -> NamedTensor | None:
        """Take the next piece; return the tensor it completes, if any."""
        cur = self._current
        if cur is None:
            cur = self._current = self._start(piece)
        elif (piece.name, piece.dtype, list(piece.shape)) != (cur.name, cur.dtype_name, list(cur.shape)):
            raise InvalidInput(
                f"piece of tensor {piece.name!r} {piece.dtype}{list(piece.shape)} while tensor {cur.name!r} "
                f"{cur.dtype_name}{list(cur.shape)} is incomplete"
            )
        data = piece.data
        if piece.offset != cur.received:
            raise InvalidInput(f"tensor {cur.name!r}: piece at byte {piece.offset}, expected byte {cur.received}")
        end = cur.received + len(data)
        if end > cur.nbytes:
            raise InvalidInput(f"tensor {cur.name!r}: piece ends at byte {end}, past its size of {cur.nbytes} bytes")
        cur.buffer[cur.received:end] = np.frombuffer(data, dtype=np.uint8)
        cur.received = end
        if not piece.last:
            return None
        if cur.received != cur.nbytes:
            raise InvalidInput(f"tensor {cur.name!r}: last piece at byte {cur.received} of {cur.nbytes}")
        self._current = None
        return NamedTensor(cur.name, _finish(cur.flat, DTYPES[cur.dtype_name], cur.shape, f"tensor {cur.name!r}"))

    def finish(self) -> None:
        """The stream has ended: raise InvalidInput if it stopped inside a tensor."""
        if self._current is not None:
            cur = self._current
            raise InvalidInput(f"stream ended inside tensor {cur.name!r} ({cur.received} of {cur.nbytes} bytes)")

    def _start(self, piece: TensorPiece) -> _Partial:
        dtype, shape, nbytes = _check_header(piece.dtype, piece.shape, f"tensor {piece.name!r}: ")
        if self.total_bytes + nbytes > self.max_bytes:
            raise ResourceExhausted(
                f"tensor {piece.name!r} {piece.dtype}{list(shape)} needs {nbytes} bytes; with the "
                f"{self.total_bytes} bytes already received that exceeds the limit of {self.max_bytes} bytes"
            )
        self.total_bytes += nbytes
        flat = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled: every byte is written once
        return _Partial(piece.name, piece.dtype, shape, nbytes, flat)


@dataclass
class _Partial:
    """A tensor being assembled: its declaration and the bytes received so far."""

    name: str
    dtype_name: str
    shape: tuple[int, ...]
    nbytes: int
    flat: torch.Tensor  # [nbytes] uint8, preallocated
    received: int = 0

    @property
    def buffer(self) -> np.ndarray:
        return self.flat.numpy()  # a writable view of the same memory


def _as_torch(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A contiguous CPU tensor of a wire dtype."""
    if isinstance(t, np.ndarray):
        try:
            t = torch.from_numpy(np.asarray(t, order="C"))
        except (TypeError, ValueError):  # numpy dtypes torch lacks, non-native byte order
            raise InvalidInput(f"dtype {t.dtype} cannot cross the wire; use one of {', '.join(DTYPES)}") from None
    elif not isinstance(t, torch.Tensor):
        raise InvalidInput(f"expected a torch.Tensor or numpy array, got {type(t).__name__}")
    if t.dtype not in _NAMES:
        raise InvalidInput(f"dtype {t.dtype} cannot cross the wire; use one of {', '.join(DTYPES)}")
    return t.detach().cpu().contiguous()


def _bytes_view(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a contiguous CPU tensor, as a flat uint8 array sharing its memory (bfloat16 included)."""
    if t.numel() == 0:  # an empty tensor may carry any strides (numpy's are 0), which view() refuses
        return np.empty(0, dtype=np.uint8)
    return t.reshape(-1).view(torch.uint8).numpy()


def _check_header(dtype_name: str, shape, where: str = "") -> tuple[torch.dtype, tuple[int, ...], int]:
    """Validate a declared dtype and shape; return the torch dtype, the shape and the size in bytes."""
    dtype = DTYPES.get(dtype_name)
    if dtype is None:
        raise InvalidInput(f"{where}unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPES)}")
    shape = tuple(shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{where}negative dimension in shape {list(shape)}")
    return dtype, shape, math.prod(shape) * dtype.itemsize


def _finish(flat: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Reinterpret a flat uint8 buffer as the declared tensor, without copying."""
    if dtype == torch.bool and bool((flat > 1).any()):  # other bytes are not valid torch bools
        raise InvalidInput(f"{what}: a bool tensor holds bytes other than 0 and 1")
    return flat.view(dtype).reshape(shape)
