"""Engine placement settings shared by every stage: where the weights live and in what precision."""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field, field_validator

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineConfig(BaseModel):
    """cpu/float32 here and in tests; cuda/bfloat16 on a GPU replica."""

    device: str = Field("cpu", description="torch device of the stage's weights and state, e.g. 'cpu', 'cuda:0'")
    dtype: str = Field("float32", description="weight and activation dtype: float32, bfloat16 or float16")

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {v!r}")
        return v

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]
