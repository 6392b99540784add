"""Engine settings: where a stage's weights live and in what precision (every stage), and how a decoding stage keeps
and batches its requests (Thinker, Talker). Imports no torch, so deployment configs validate without it."""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

_DTYPES = ("float32", "bfloat16", "float16")  # torch's names; torch is imported only when one is used


# How long a step waits for the requests in progress whose next input is not there yet (`services.batching`), in
# process and as the stage apps' default `batch_wait_ms`. A request alone never waits. Talker: about one MTP round
# trip, so that requests that fell into two groups (one in MTP while the other steps) merge into one step. Code2Wav:
# a Talker step's frames reach it one stream at a time through the gateway. On 2 CPU cores, 6 turns at once:
# 7.1 -> 10.2 audio s/s in process, 7.6 -> 10.6-12.4 through `omni serve` (`omni bench load`; 0 and 2 ms before).
# Thinker: a request sends its next token a few event-loop turns after its last one, so without a wait its steps
# split in two or three (2.9 rows a step at 6 turns at once in process, 5.3-6.0 with it). The Thinker's and the
# Talker's prompts wait as long for those that are starting beside them: turns that start together prefill together.
THINKER_BATCH_WAIT_MS = 5.0
TALKER_BATCH_WAIT_MS = 20.0
CODE2WAV_BATCH_WAIT_MS = 8.0
# Every step stage replays a trace per batch size (`services.engines.replay`), made at that size's first step: 0.13
# s for MTP, 0.07 s each for Code2Wav's first and steady frames, 0.04 s for a Thinker or Talker decode step at the
# tiny checkpoint's widths. A replica traces the sizes up to this at startup (2.5 s for MTP, 1.4 s for Code2Wav,
# 0.3 s for the Thinker and the Talker), so that the first turns that run together wait for none: 6 turns at once
# in process, first audio p95 313-384 -> 111 ms (`omni bench load`).
WARM_BATCH = 8


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
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


class KVConfig(BaseModel):
    """A decoding stage's request state (Thinker, Talker): one replica's KV cache, shared by its requests
    (`services.engines.kv_pages`; DESIGN.md section 7)."""

    kv_tokens: int = Field(65536, ge=1, description="positions of KV cache the replica preallocates for all its "
                                                    "requests together; a request reserves prompt + new tokens")
    page_size: int = Field(16, ge=1, le=4096, description="positions per page of the KV cache")
    prefill_chunk: int = Field(512, ge=1, description="prompt tokens per prefill call: the longest a new request's "
                                                      "prefill holds back the decode steps of the others")
