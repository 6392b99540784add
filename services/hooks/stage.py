"""The hook stage as the conductor sees it: one turn's session, in this process or in the hooks application.

    async with hooks.open(ctx) as turn:          # one turn
        released = await turn.feed(token_id)     # per Thinker token: what is released now (maybe nothing)
        released = await turn.thinker_end(stopped)   # the Thinker stopped: `resume` ids, or the rest of the text

`LocalHooks` runs a `FilterChain` here; `services.remote.RemoteHooks` calls `omni.v1.Hooks/Filter` with the same
contract, so the conductor conducts either the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol

from services.checkpoint.variant import reasoning_tags
from services.hooks.sdk import FilterChain, HookContext, HookSession, Released
from services.metrics import StageTimer


class HookTurn(Protocol):
    async def feed(self, token_id: int) -> Released: ...

    async def thinker_end(self, stopped: bool) -> Released: ...


class HookStage(Protocol):
    async def tool_schemas(self) -> list[dict] | None:
        """The tools to declare in the Thinker's prompt; None without tools."""

    def open(self, ctx: HookContext) -> AbstractAsyncContextManager[HookTurn]:
        """One turn; leaving the context ends it however it went (filters free their state)."""


class LocalHooks:
    """A chain run in this process with the checkpoint's tokenizer and chat template (`processor`)."""

    def __init__(self, chain: FilterChain, processor):
        self.chain = chain
        self.processor = processor
        self.reasoning = reasoning_tags(processor)

    async def tool_schemas(self) -> list[dict] | None:
        return self.chain.tool_schemas()

    @asynccontextmanager
    async def open(self, ctx: HookContext) -> AsyncIterator[HookTurn]:
        session = self.chain.session(ctx, self.processor.tokenizer, render=self.processor.apply_chat_template,
                                     reasoning=self.reasoning)
        with StageTimer("hooks") as timer:
            try:
                yield _TimedTurn(session, timer)
            finally:
                await session.aclose()


class _TimedTurn:
    """A hook session whose first released text is the hook stage's first output (its TTFT: the Thinker's start
    plus whatever the filters held back), and each further release an item."""

    def __init__(self, session: HookSession, timer: StageTimer):
        self.session, self.timer = session, timer

    async def feed(self, token_id: int) -> Released:
        return self._timed(await self.session.feed(token_id))

    async def thinker_end(self, stopped: bool) -> Released:
        return self._timed(await self.session.thinker_end(stopped))

    def _timed(self, released: Released) -> Released:
        if released.token_ids:
            self.timer.output(len(released.token_ids))
        return released


def plain_conversation(messages: Sequence[dict]) -> list[dict]:
    """Chat messages as JSON values (the Hooks wire's `conversation_json`): text kept, media parts reduced to their
    type, which is all the chat template renders of them."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [{"type": "text", "text": part.get("text", "")} if part.get("type") == "text"
                       else {"type": part.get("type")} for part in content]
        out.append({**{k: v for k, v in m.items() if isinstance(v, str | int | float | bool | None)},
                    "role": m["role"], "content": content})
    return out
