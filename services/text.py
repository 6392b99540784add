"""Incremental detokenization: turn a growing list of token ids into text deltas without splitting characters."""

from __future__ import annotations


class Detokenizer:
    """Byte-level BPE tokens can end inside a multi-byte character; such text is held until it completes."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._text = ""

    def push(self, ids: list[int]) -> str:
        self._ids.extend(ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        delta, self._text = text[len(self._text):], text
        return delta

    @property
    def text(self) -> str:
        return self._text
