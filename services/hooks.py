"""The text hook point between the Thinker and the Talker: it decides which text is released.

The Talker only ever receives released tokens, and the client's text stream shows the same released text, so what
is read is what is heard. Until the hook stage exists (its own issue), the chain is the identity.
"""

from __future__ import annotations

from typing import Protocol


class TextHook(Protocol):
    def feed(self, token_id: int) -> list[int]:
        """Take the Thinker's next token; return the tokens released now (possibly none, possibly rewritten)."""

    def finish(self) -> list[int]:
        """The Thinker has ended: return whatever is still held."""


class IdentityHook:
    """Releases every token as it arrives."""

    def feed(self, token_id: int) -> list[int]:
        return [token_id]

    def finish(self) -> list[int]:
        return []
