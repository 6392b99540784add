"""The processor's tokenizer, with each run of one media placeholder (an audio's N `<|audio_pad|>`, an image's or a
video's pads) tokenized as a single token whose id is then repeated N times.

The processor writes a medium's placeholder once per embedding: a 120 s audio is 1,560 `<|audio_pad|>` in the prompt
text. Tokenizing that text and turning its ids into tensors took 6 of the 12-14 ms of `build_turn` at the end of
such a turn (and grows with the audio: about 0.1 s for the paper's 40 minutes), though the text around the media is
short. A placeholder is an added special token: the tokenizer splits the text at added tokens before anything else,
so a run of N of them is N of its id whatever surrounds the run, and the text between the runs tokenizes the same.
The result equals the tokenizer's own (tests/test_placeholder_runs.py compares them); any call but the processor's
(one text, `padding_side` and `return_tensors` at most) is the tokenizer's own.

    RunLengthPlaceholders.adopt(processor.tokenizer, [processor.audio_token, ...])   # `preprocess.load_processor`
    processor._check_special_mm_tokens = MethodType(check_placeholder_counts, processor)

The processor then checks that the ids hold as many placeholders as the text (no truncation): with a regex's list of
every match, 3 ms of the end of a 10-minute turn; `check_placeholder_counts` counts them with `str.count`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import BatchEncoding

_SIMPLE_KWARGS = frozenset({"padding_side", "return_tensors"})
_MARKER = "\U000f0000"  # transformers' `mark_control_tokens` marker: such text takes the tokenizer's own path


class RunLengthPlaceholders:
    """A mixin over the checkpoint's tokenizer class (`adopt` makes an instance one)."""

    _placeholder_runs: re.Pattern
    _placeholder_ids: dict[str, int]  # placeholder token -> its id

    @classmethod
    def adopt(cls, tokenizer, placeholders: Sequence[str]) -> None:
        base = type(tokenizer)
        if not issubclass(base, cls):
            tokenizer.__class__ = type(f"RunLength{base.__name__}", (cls, base), {})
        tokens = [p for p in placeholders if p]
        ids = tokenizer.convert_tokens_to_ids(tokens)
        tokenizer._placeholder_ids = dict(zip(tokens, ids, strict=True))
        tokenizer._placeholder_runs = re.compile("|".join(f"(?:{re.escape(p)})+" for p in tokens) or r"(?!)")

    def __call__(self, text=None, *args, **kwargs):
        texts = [text] if isinstance(text, str) else text
        simple = (not args and isinstance(texts, list) and len(texts) == 1 and isinstance(texts[0], str)
                  and _MARKER not in texts[0] and set(kwargs) <= _SIMPLE_KWARGS
                  and kwargs.get("return_tensors") in ("pt", None))
        encoded = self._collapsed(texts[0], kwargs.get("padding_side")) if simple else None
        if encoded is None:
            return super().__call__(text, *args, **kwargs)
        if kwargs.get("return_tensors") == "pt":
            encoded = {k: v[None] for k, v in encoded.items()}
        elif isinstance(text, str):
            encoded = {k: v.tolist() for k, v in encoded.items()}
        else:
            encoded = {k: [v.tolist()] for k, v in encoded.items()}
        return BatchEncoding(encoded)

    def _collapsed(self, text: str, padding_side: str | None) -> dict[str, torch.Tensor] | None:
        """Each key's ids [L] for `text`, its runs tokenized once; None if the ids do not show one placeholder id
        per run (never seen: the caller then takes the tokenizer's own path)."""
        pieces, runs, last = [], [], 0  # runs: (placeholder id, length) in text order
        for m in self._placeholder_runs.finditer(text):
            token = next(p for p in self._placeholder_ids if m.group().startswith(p))
            pieces += [text[last:m.start()], token]
            runs.append((self._placeholder_ids[token], len(m.group()) // len(token)))
            last = m.end()
        if not runs or all(n == 1 for _, n in runs):
            return None  # nothing to gain
        pieces.append(text[last:])
        kwargs = {} if padding_side is None else {"padding_side": padding_side}
        short = super().__call__("".join(pieces), **kwargs)
        ids = torch.tensor(short["input_ids"])
        at = torch.isin(ids, torch.tensor(sorted(set(self._placeholder_ids.values())))).nonzero()[:, 0]
        if len(at) != len(runs) or ids[at].tolist() != [i for i, _ in runs]:
            return None
        repeats = torch.ones(len(ids), dtype=torch.long)
        repeats[at] = torch.tensor([n for _, n in runs])
        return {k: torch.tensor(v).repeat_interleave(repeats) for k, v in short.items()}


def check_placeholder_counts(processor, text: list[str], text_inputs, modalities: list[str]) -> None:
    """`ProcessorMixin._check_special_mm_tokens`, the same result and error: each modality's placeholder id as many
    times in each row of ids as its token in the text, not counting a token transformers marked as control text
    (its `_CONTROL_TOKEN_START` just before it), which the parent's regex skips with a lookbehind."""
    input_ids = text_inputs["input_ids"]
    if hasattr(input_ids, "tolist"):
        input_ids = input_ids.tolist()
    for modality in modalities:
        token_str = getattr(processor, f"{modality}_token", None)
        token_id = getattr(processor, f"{modality}_token_id", None)
        if token_str is None or token_id is None:
            continue
        ids_count = [list(ids).count(token_id) for ids in input_ids]
        text_count = [sample.count(token_str) - sample.count(_MARKER + token_str) for sample in text]
        if ids_count != text_count:
            raise ValueError(
                f"Mismatch in `{modality}` token count between text and `input_ids`. Got ids={ids_count} and "
                f"text={text_count}. Likely due to `truncation='max_length'`. Please disable truncation or increase "
                "`max_length`.")
