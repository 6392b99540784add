"""What one turn emits, in order: text deltas and audio chunks interleaved as they happen, then one summary.

These typed messages are the event model the gRPC `Converse` stream carries; stages never pass untyped dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.hooks.sdk import HookEvent  # what a text filter tells the client (redacted, blocked, tool call)


@dataclass(frozen=True)
class TextDelta:
    """Released text (what the Talker speaks), with the Thinker token ids it came from."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ReasoningDelta:
    """Released reasoning: what a Thinking model writes between `<think>` and `</think>` (tags left out), shown
    apart from the answer and never spoken, with the Thinker token ids it came from."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class AudioChunk:
    """One Code2Wav output packet: 24 kHz mono, sequence-numbered from 0 within the turn."""

    seq: int
    samples: np.ndarray  # float32 in [-1, 1], before PCM16 quantization
    sample_rate: int
    # The codec frames (16 codes each) handed to Code2Wav since the previous packet: the packets so far carry the
    # codes of every frame whose audio has started to reach the client (a cancelled turn's summary has them).
    codes: tuple[tuple[int, ...], ...] = ()

    @property
    def pcm16(self) -> bytes:
        return float_to_pcm16(self.samples).tobytes()


@dataclass
class TurnSummary:
    text: str
    thinker_token_ids: list[int]  # generated tokens only (the Thinker's stop token included, as the reference)
    codes: list[list[int]]  # frames x 16 codec ids
    sample_rate: int
    num_samples: int
    speaker: str | None
    finish_reason: str  # "stop" (Thinker's end token), "length" (max_new_tokens), "blocked" or "cancelled"
    timings: dict[str, float] = field(default_factory=dict)  # seconds; see Conductor for the keys
    reasoning: str = ""  # the released reasoning, apart from `text`; "" when the model wrote none


Event = TextDelta | ReasoningDelta | AudioChunk | HookEvent | TurnSummary


def float_to_pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2")
