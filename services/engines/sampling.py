"""Token selection shared by the autoregressive engines, built from transformers' own logits processors.

The processors and their order are those of `GenerationMixin._get_logits_processor` (repetition penalty, suppressed
tokens, then, only when sampling, temperature, top-k, top-p) and the draw is `_sample`'s (float32 scores, argmax or
softmax + multinomial), so a greedy engine picks exactly the ids `generate` picks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from services.errors import InvalidInput


@dataclass(frozen=True)
class SamplingParams:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise InvalidInput(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise InvalidInput(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def warpers(params: SamplingParams) -> LogitsProcessorList:
    """Temperature, top-k, top-p: what `generate` adds only when `do_sample` (empty when greedy)."""
    out = LogitsProcessorList()
    if params.greedy:
        return out
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k != 0:
        out.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=params.top_p))
    return out


def apply_processors(processors: LogitsProcessorList, input_ids: Tensor | None, scores: Tensor) -> Tensor:
    """What `LogitsProcessorList.__call__` does for processors of (input_ids, scores) only, as all of ours are, less
    its `inspect.signature` of each processor at every call (a fifth of a Talker step's time at 6 rows)."""
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


def greedy_ids(scores: Tensor) -> Tensor:
    """scores [B, V] -> [B] ids: `generate`'s `argmax`, from `max`, which returns the same index (the first maximal
    one, a NaN's if any: both are documented so) and is 3x faster on the CPU (the Thinker's 152k ids: 208 -> 68 us a
    row)."""
    return scores.max(dim=-1).indices


def draw(scores: Tensor, greedy: bool, generator: torch.Generator | None = None) -> Tensor:
    """scores: [B, V] processed float32 scores -> [B] ids."""
    if greedy:
        return greedy_ids(scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class _SuppressTokens(SuppressTokensLogitsProcessor):
    """transformers' processor, its mask over the vocabulary made once per vocabulary size and device rather than at
    every call: its `torch.isin` of every id was two thirds of a Talker row's sampling."""

    def __init__(self, suppress_tokens, device: str | torch.device = "cpu"):
        super().__init__(suppress_tokens, device=device)
        self._masks: dict[tuple[int, torch.device], Tensor] = {}

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        key = (scores.shape[-1], scores.device)
        mask = self._masks.get(key)
        if mask is None:
            vocab = torch.arange(scores.shape[-1], device=scores.device)
            mask = self._masks[key] = torch.isin(vocab, self.suppress_tokens.to(scores.device))
        return torch.where(mask, -float("inf"), scores)


class Sampler:
    """Per-request token selection: the token history (for the repetition penalty) and the request's RNG."""

    def __init__(self, params: SamplingParams, suppress_tokens: Sequence[int] = (), device: str | torch.device = "cpu"):
        self.params = params
        self.device = torch.device(device)
        self.suppress_tokens = tuple(suppress_tokens)
        # The history's ids, in a tensor grown in place: a list made into a tensor at every step cost 0.7 us an id,
        # 4 ms a Talker step of 6 rows 1,000 frames into their speech.
        self._ids = torch.empty(64, dtype=torch.long, device=self.device)
        self.drawn = 0  # tokens drawn so far: the history's length
        self.processors = LogitsProcessorList()
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        if suppress_tokens:
            self.processors.append(_SuppressTokens(suppress_tokens, device=self.device))
        self.processors.extend(warpers(params))
        # Samplers with equal keys have the same processors (`process_rows`)
        self.processors_key = (params.repetition_penalty, self.suppress_tokens, params.greedy, params.temperature,
                               params.top_k, params.top_p, self.device)
        self.generator = torch.Generator(self.device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def process(self, logits: Tensor) -> Tensor:
        """logits: [V] -> [1, V] float32 scores after every processor, given the history so far."""
        scores = logits.reshape(1, -1).to(device=self.device, dtype=torch.float32)
        if not self.processors:
            return scores
        return apply_processors(self.processors, self.ids()[None], scores)

    def ids(self) -> Tensor:
        """[T] the history's ids."""
        return self._ids[:self.drawn]

    @property
    def history(self) -> list[int]:
        return self.ids().tolist()

    def record(self, token: int) -> None:
        """The next token drawn: into the history."""
        if self.drawn == len(self._ids):
            self._ids = torch.cat((self._ids, torch.empty_like(self._ids)))
        self._ids[self.drawn] = token
        self.drawn += 1

    def __call__(self, logits: Tensor) -> int:
        token = int(draw(self.process(logits), self.params.greedy, self.generator)[0])
        self.record(token)
        return token


def process_rows(samplers: Sequence[Sampler], logits: Tensor) -> Tensor:
    """logits [B, V] -> [B, V] float32 scores, row b `samplers[b].process(logits[b])`'s. The rows whose samplers have
    the same processors go through them in one call: they work on each row alone (the repetition penalty's gather and
    scatter, elementwise `where`s, per-row top-k and top-p), so a row's scores are its bits alone. A history shorter
    than the others' is padded with its own first id, which the penalty's gather and scatter then read and write once
    more, with the same value; a row with no history yet goes alone."""
    scores = logits.to(device=samplers[0].device, dtype=torch.float32, copy=True)  # a Talker's samplers share one
    groups: dict[tuple, list[int]] = {}
    for row, sampler in enumerate(samplers):
        if not sampler.processors:
            continue
        if sampler.drawn:
            groups.setdefault(sampler.processors_key, []).append(row)
        else:
            scores[row] = sampler.process(logits[row])[0]
    for rows in groups.values():
        padded = pad_sequence([samplers[row].ids() for row in rows], batch_first=True, padding_value=-1)
        padded = torch.where(padded < 0, padded[:, :1], padded)  # each row's own first id
        scores[rows] = apply_processors(samplers[rows[0]].processors, padded, scores[rows])
    return scores


def sample_rows(samplers: Sequence[Sampler], logits: Tensor) -> list[int]:
    """logits [B, V] -> each row's token, as `samplers[b](logits[b])` draws it (and each history grows by it):
    `process_rows`, then one `greedy_ids` for the greedy rows, and a draw with its own generator for each sampled row.
    A Talker step of 6 rows: about 0.2 ms, against 0.3 to 0.5 ms row by row."""
    scores = process_rows(samplers, logits)
    greedy = [row for row, sampler in enumerate(samplers) if sampler.params.greedy]
    tokens: list[int] = [0] * len(samplers)
    for row, token in zip(greedy, greedy_ids(scores[greedy]).tolist() if greedy else [], strict=True):
        tokens[row] = token
    for row, sampler in enumerate(samplers):
        if not sampler.params.greedy:
            tokens[row] = int(draw(scores[row:row + 1], False, sampler.generator)[0])
        sampler.record(tokens[row])
    return tokens
