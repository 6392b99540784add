"""Built-in text filters, by entry point name: `redact` (patterns or words -> a replacement), `block` (`Blocklist`:
patterns or words -> stop with the fallback) and `sentences` (release whole sentences, for the filters after it).

A pattern can be split across any number of pieces ("John" + " Sm" + "ith"): the matchers hold text from where a
match could still begin until more text decides it (regex partial matching). A link's `lookahead` lets them see
further pieces too, for patterns whose match depends on text after it (`a|abcd` matches "a" until "bcd" is seen).
"""

from __future__ import annotations

from collections.abc import Sequence

import regex

from services.errors import InvalidInput
from services.hooks.sdk import Block, FilterTurn, Hold, Release, TextFilter, Verdict


# Scripts written without spaces between words (Chinese, Japanese, Thai...): their letters never glue to a word,
# and a word of theirs needs no boundary, or "密码" would never match inside "我的密码是".
_UNSPACED = r"\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"
_GLUE = rf"(?:(?![{_UNSPACED}])\w)"  # a character that would make a word part of a longer one
_UNSPACED_CHAR = regex.compile(rf"[{_UNSPACED}]")


def _word(word: str) -> str:
    """`word` as a whole word: not glued to letters or digits on either side (boundaries by \\w, not \\b, so
    "c++" matches before a space), except on an edge that is itself in an unspaced script."""
    left = "" if _UNSPACED_CHAR.match(word[:1]) else rf"(?<!{_GLUE})"
    right = "" if _UNSPACED_CHAR.match(word[-1:]) else rf"(?!{_GLUE})"
    return left + regex.escape(word) + right


class _Matcher:
    """Regex patterns and whole-word lists as one pattern, matched over text that arrives in pieces."""

    def __init__(self, patterns: Sequence[str], words: Sequence[str], ignore_case: bool):
        alternatives = [f"(?:{p})" for p in patterns]
        # longest first, so "new york city" wins over "new york"
        alternatives += [_word(w) for w in sorted(words, key=len, reverse=True)]
        if not alternatives:
            raise InvalidInput("give at least one pattern or word")
        flags = regex.IGNORECASE | regex.FULLCASE if ignore_case else 0
        try:
            self.regex = regex.compile("|".join(alternatives), flags)
        except regex.error as e:
            raise InvalidInput(f"invalid pattern: {e}") from None
        if self.regex.search(""):
            raise InvalidInput(f"a pattern matches empty text: {self.regex.pattern!r}")

    def scan(self, text: str, ahead: str, final: bool) -> tuple[list[regex.Match], int]:
        """The matches that start in `text` and that more text cannot change, and where the decided text ends:
        before the first match that more text could still change (a partial one, or one that reaches past `text`
        or to the end of all the text known so far)."""
        known = text + ahead
        found = []
        for m in self.regex.finditer(known, partial=not final):
            if m.start() >= len(text):
                break
            if not final and (m.partial or m.end() > len(text) or m.end() == len(known)):
                return found, m.start()
            found.append(m)
        return found, len(text)


class Redact(TextFilter):
    """Replace every match of `patterns` (regexes) or `words` (whole words or phrases) by `replacement`."""

    def __init__(self, patterns: Sequence[str] = (), words: Sequence[str] = (), replacement: str = "[redacted]",
                 ignore_case: bool = False):
        self.matcher = _Matcher(patterns, words, ignore_case)
        self.replacement = replacement

    async def on_text(self, text: str, turn: FilterTurn) -> Verdict:
        return self._redact(text, turn, final=False)

    async def on_end(self, text: str, turn: FilterTurn) -> Verdict:
        return self._redact(text, turn, final=True)

    def _redact(self, text: str, turn: FilterTurn, final: bool) -> Release:
        found, cut = self.matcher.scan(text, "" if final else turn.ahead, final)
        out, pos = [], 0
        for m in found:
            out += [text[pos:m.start()], self.replacement]
            pos = m.end()
        out.append(text[pos:cut])
        if found:  # the count only: the matched text is what must not leak
            turn.emit("redacted", f"{len(found)} match(es) replaced", count=len(found))
        return Release("".join(out), keep=text[cut:])


class Blocklist(TextFilter):
    """Stop the answer at the first match of `patterns` or `words`; nothing of the matching text is released."""

    def __init__(self, patterns: Sequence[str] = (), words: Sequence[str] = (), ignore_case: bool = False,
                 reason: str = "the answer matched a blocked pattern", fallback: str | None = None):
        self.matcher = _Matcher(patterns, words, ignore_case)
        self.reason, self.fallback = reason, fallback

    async def on_text(self, text: str, turn: FilterTurn) -> Verdict:
        found, cut = self.matcher.scan(text, turn.ahead, final=False)
        return Block(self.reason, self.fallback) if found else Release(text[:cut], keep=text[cut:])

    async def on_end(self, text: str, turn: FilterTurn) -> Verdict:
        found, _ = self.matcher.scan(text, "", final=True)
        return Block(self.reason, self.fallback) if found else Release(text)


# A sentence ends at . ! ? … (with closing quotes or brackets) before whitespace, at CJK end punctuation, or at a
# line break. "3.14" and "e.g.x" are not ends: the whitespace after the stop has to be seen. The cut is before that
# whitespace, which byte-level BPE attaches to the next word: releases then fall on token boundaries.
_SENTENCE_END = regex.compile(r"[.!?…]+[\"'”’»)\]]*(?=\s)|[。！？]+[\"'”’»)\]」』]*|\n+")


class Sentences(TextFilter):
    """Release text one or more whole sentences at a time. A run longer than `max_chars` without a sentence end is
    released up to its last space (or whole, for one very long word), so nothing waits forever."""

    def __init__(self, max_chars: int = 400):
        if max_chars < 1:
            raise InvalidInput(f"max_chars must be at least 1, got {max_chars}")
        self.max_chars = max_chars

    async def on_text(self, text: str, turn: FilterTurn) -> Verdict:
        cut = 0
        for m in _SENTENCE_END.finditer(text):
            cut = m.end()
        if not cut and len(text) > self.max_chars:
            cut = text.rfind(" ") + 1 or len(text)
        return Release(text[:cut], keep=text[cut:]) if cut else Hold()
