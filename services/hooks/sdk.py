"""The hook stage's SDK: text filters between the Thinker and the Talker, chained and run per request.

    Thinker ids ─> text pieces ─> tool-call scanner ─> filter 1 ─> ... ─> filter N ─> Released(token_ids, text)
                                        └─> ToolCall (never released)

Audio that has been spoken cannot be taken back, so the chain decides what is released: the Talker speaks only
released tokens and the client reads only released text. A filter sees the answer's text in order and, for each
piece, releases it (possibly rewritten, possibly keeping a tail for later), holds it (it comes back joined with the
next piece) or blocks the rest of the answer (the session releases the fallback and says why). A filter object is
shared by all requests; what it learns about one request lives in that request's `FilterTurn`.

Token ids: while the released text is the Thinker's text (delayed or not), the session releases the Thinker's own
token ids, so an empty chain is an exact pass-through; once a filter changes the text, released text is re-encoded
with the checkpoint's tokenizer (the Talker re-embeds released ids itself, so any text can be spoken).

Reasoning: what a Thinking model writes between `<think>` and `</think>` at the start of an answer (the tokens of
`services.checkpoint.variant.reasoning_tags`) goes through the same filters first, with `FilterTurn.reasoning`
set, and ends with its own `on_end`; then the answer follows. It is released as `Released.reasoning`, which the
client shows apart and the Talker never gets; tool calls count only in the answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from services.checkpoint.variant import ReasoningTags
from services.errors import InvalidInput, OmniError
from services.hooks.tools import Piece, ToolCall, ToolCallScanner, ToolRegistry, continuation_text, run_tools
from services.metrics import TTFT_BUCKETS, _Histogram

log = logging.getLogger(__name__)

DEFAULT_FALLBACK = "Sorry, I can't help with that."

# The hook stage's own time per Thinker token: microseconds for built-in filters, a round trip for remote ones.
OVERHEAD_BUCKETS = [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04,
                    0.08, 0.16, 0.5, 1.0]
HOOK_TIME_TO_FIRST_RELEASE = _Histogram(
    "omni_hook_time_to_first_release_seconds", "From the Thinker's first token to the hook stage's first released text",
    TTFT_BUCKETS, ())
HOOK_OVERHEAD = _Histogram("omni_hook_overhead_seconds", "Time the hook stage spends on one Thinker token",
                           OVERHEAD_BUCKETS, ())


class FilterFailed(OmniError):
    """A text filter with `on_error="fail"` raised: the request ends with this error, which names the filter."""


@dataclass(frozen=True)
class HookContext:
    """The request a session works for; filters read it through `FilterTurn.ctx`."""

    request_id: str = ""
    session_id: str = ""
    conversation: Sequence[dict] = ()  # chat messages up to this answer (the Thinker's prompt)
    metadata: Mapping[str, str] = field(default_factory=dict)  # the client's metadata
    principal: str = ""  # the authenticated tenant (services.auth); "" when authentication is off


@dataclass(frozen=True)
class HookEvent:
    """Something the hook stage tells the client (`omni.v1.HookEvent`)."""

    hook: str  # the link that raised it ("tools" for tool calls)
    type: str  # e.g. "redacted", "blocked", "filter_skipped", "tool_call"
    message: str = ""
    data: Mapping[str, Any] = field(default_factory=dict)


# --- verdicts: what a filter answers for a piece ---------------------------------------------------------------------


@dataclass(frozen=True)
class Release:
    """Pass `text` on now; `keep` (unreleased input) comes back before the next piece. At the end, `keep` is
    dropped."""

    text: str
    keep: str = ""


@dataclass(frozen=True)
class Hold:
    """Release nothing yet: the whole text comes back, joined with the next piece. At the end, it is dropped."""


@dataclass(frozen=True)
class Block:
    """Stop the answer: nothing more is released, the session releases `fallback` (None: the chain's)."""

    reason: str
    fallback: str | None = None


Verdict = Release | Hold | Block


class FilterTurn:
    """One filter's view of one request: the context, the filter's own state and look-ahead, and its events."""

    def __init__(self, name: str, ctx: HookContext, events: list[HookEvent]):
        self.name = name
        self.ctx = ctx
        self.state: Any = None  # the filter's per-request data; set it in `start`
        self.ahead = ""  # the next pieces, for a link with look-ahead; the verdict is about the text only
        self.reasoning = False  # the text is the model's reasoning (never spoken), not its answer
        self._events = events

    def emit(self, type: str, message: str = "", **data: Any) -> None:
        self._events.append(HookEvent(self.name, type, message, data))


class TextFilter:
    """Base of every filter; override `on_text` (and `start`, `on_end`, `stop` when needed). The defaults pass
    everything through. The object is shared by concurrent requests: keep per-request data in `turn.state`.
    Methods are coroutines; a filter with CPU-heavy work should run it in a thread (`asyncio.to_thread`)."""

    async def start(self, turn: FilterTurn) -> None:
        """A request begins."""

    async def on_text(self, text: str, turn: FilterTurn) -> Verdict:
        """`text`: what this filter held plus the next piece. `turn.ahead`: the pieces after it (look-ahead)."""
        return Release(text)

    async def on_end(self, text: str, turn: FilterTurn) -> Verdict:
        """The answer is complete (or, with `turn.reasoning`, the reasoning before it); `text` is what this filter
        still holds (maybe empty)."""
        return Release(text)

    async def stop(self, turn: FilterTurn) -> None:
        """The request is over, however it ended (finished, blocked, failed, cancelled): free what `start` took."""


@dataclass(frozen=True)
class Link:
    """A filter in a chain, with the chain's policy for it."""

    filter: TextFilter
    name: str
    on_error: Literal["fail", "skip"] = "fail"  # a raising filter ends the request, or is bypassed from then on
    lookahead: int = 0  # pieces the filter sees beyond the text it decides on (`turn.ahead`)


class FilterChain:
    """The hook stage of a deployment: filters in order, the fallback, the tools. Built once, shared by requests;
    `session()` runs it for one request."""

    def __init__(self, filters: Sequence[TextFilter | Link] = (), *, fallback: str = DEFAULT_FALLBACK,
                 tools: ToolRegistry | None = None, max_tool_steps: int = 4):
        self.links = [f if isinstance(f, Link) else Link(f, type(f).__name__.lower()) for f in filters]
        self.fallback = fallback
        self.tools = tools or ToolRegistry()
        self.max_tool_steps = max_tool_steps  # Thinker continuations with tool results per turn

    def session(self, ctx: HookContext, tokenizer, render=None, reasoning: ReasoningTags | None = None) -> HookSession:
        """`render`: the chat template for tool continuations (default: the tokenizer's `apply_chat_template`);
        `reasoning`: the checkpoint's reasoning tags, to release reasoning apart from the answer."""
        return HookSession(self, ctx, tokenizer, render, reasoning)

    def tool_schemas(self) -> list[dict] | None:
        """The tools as the Thinker's chat template declares them; None without tools."""
        return self.tools.schemas() if len(self.tools) else None

    def only(self, names: Sequence[str]) -> FilterChain:
        """The chain of the named links, in the given order (same fallback and tools); empty: this chain."""
        if not names:
            return self
        links = {link.name: link for link in self.links}
        unknown = [n for n in names if n not in links]
        if unknown:
            raise InvalidInput(f"unknown text filter {', '.join(map(repr, unknown))}; this hook stage has "
                               f"{', '.join(map(repr, links)) or 'none'}")
        return FilterChain([links[n] for n in names], fallback=self.fallback, tools=self.tools,
                           max_tool_steps=self.max_tool_steps)


@dataclass
class Released:
    """What one `feed` or `finish` releases: token ids for the Talker, the same text for the client."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    events: list[HookEvent] = field(default_factory=list)
    stop: bool = False  # blocked: stop the Thinker; `text` is the fallback
    tool_calls: list[ToolCall] = field(default_factory=list)  # completed calls, run at the Thinker's end
    resume: list[int] | None = None  # from `thinker_end`: ids to append for the Thinker to go on (tool results)
    reasoning: str = ""  # released reasoning, for the client only
    reasoning_ids: list[int] = field(default_factory=list)  # its Thinker ids (the tags included)

    def extend(self, more: Released) -> Released:
        """Append what `more` releases (in order) to this."""
        self.token_ids += more.token_ids
        self.text += more.text
        self.reasoning += more.reasoning
        self.reasoning_ids += more.reasoning_ids
        self.events += more.events
        self.tool_calls += more.tool_calls
        self.stop = self.stop or more.stop
        return self


class _Blocked(Exception):
    def __init__(self, link: str, verdict: Block):
        super().__init__(verdict.reason)
        self.link, self.verdict = link, verdict


class HookSession:
    """One request through a chain: `await feed(token_id)` for each Thinker token (its stop token excepted),
    `await thinker_end(stopped)` each time the Thinker stops (it may answer `resume`), or `await finish()` at the
    end of the answer; `await aclose()` if the request ends otherwise."""

    def __init__(self, chain: FilterChain, ctx: HookContext, tokenizer, render=None,
                 reasoning: ReasoningTags | None = None):
        self.chain, self.ctx = chain, ctx
        self._tokenizer = tokenizer
        self._render = render or tokenizer.apply_chat_template
        self._messages = list(ctx.conversation)  # grows by each tool step
        self._step_ids: list[int] = []  # the Thinker's ids since it last stopped
        self._calls: list[ToolCall] = []  # tool calls since it last stopped
        self._tool_steps = 0
        self._events: list[HookEvent] = []
        self._decoder = _Decoder(tokenizer)
        self._scanner = ToolCallScanner() if len(chain.tools) else None
        self._links = [_LinkRun(link, ctx, self._events) for link in chain.links]
        self._ids = _IdMapper(tokenizer)
        self._reasoning_ids = _IdMapper(tokenizer)
        self._tags = reasoning
        self._phase = ""  # of the current Thinker generation: "start", "reasoning" or "answer"
        self._begin_generation()
        self._identity = not self._links and self._scanner is None
        self._started = self._closed = self._blocked = False
        self._t_first: float | None = None
        self._last_char = ""  # of the released text, to separate the fallback from it
        self._overheads: list[float] = []  # seconds spent in each feed/finish
        self.first_release_s: float | None = None  # first Thinker token -> first released text

    async def feed(self, token_id: int) -> Released:
        t0 = time.perf_counter()
        if self._t_first is None:
            self._t_first = t0
        self._step_ids.append(token_id)
        channel = self._channel(token_id)
        if channel in ("open", "close"):  # a tag is the reasoning's, never text
            self._decoder = _Decoder(self._tokenizer)
        if self._identity:  # nothing can hold or change the text: the Thinker's ids, as they come
            if channel in ("open", "close"):
                return self._done(t0, Released(reasoning_ids=[token_id]))
            piece = self._decoder.push(token_id)
            text = piece.text if piece else ""
            if channel == "reasoning":
                return self._done(t0, Released(reasoning=text, reasoning_ids=[token_id]))
            return self._done(t0, Released([token_id], text))
        if self._closed:
            return Released(stop=self._blocked)
        if channel == "open":
            released = Released(reasoning_ids=[token_id])
        elif channel == "close":  # the reasoning is complete: the filters decide on what they hold of it
            released = await self._run([], final=True, reasoning=True)
            released.reasoning_ids.append(token_id)
        else:
            piece = self._decoder.push(token_id)
            released = await self._run([piece] if piece else [], final=False, reasoning=channel == "reasoning")
        released = self._done(t0, released)
        self._calls += released.tool_calls
        if released.stop:
            await self.aclose()
        return released

    async def thinker_end(self, stopped: bool) -> Released:
        """The Thinker stopped: at its stop token (`stopped`) or at its token cap. If it called tools since it last
        stopped and tool steps are left, run them and answer `resume`: the ids to append to its prompt after its
        own (stop token included) for it to go on. Otherwise the answer is complete: `finish()`."""
        calls, self._calls = self._calls, []
        step_ids, self._step_ids = self._step_ids, []
        if self._closed or not calls or self._tool_steps >= self.chain.max_tool_steps:
            return await self.finish()
        self._tool_steps += 1
        self._messages.append({"role": "assistant",
                               "content": self._tokenizer.decode(step_ids, skip_special_tokens=True)})
        results = await run_tools(calls, self.chain.tools, self.ctx)
        text = await asyncio.to_thread(continuation_text, self._render, self._messages, results,
                                       self.chain.tool_schemas(), stopped)
        self._messages += results
        self._begin_generation()  # the continuation is a new assistant turn: it may reason again
        return Released(events=self._take_events(),
                        resume=self._tokenizer.encode(text, add_special_tokens=False))

    async def finish(self) -> Released:
        """The answer is complete: release what is held (an incomplete character at the very end is dropped, as
        `services.text.Detokenizer` does)."""
        t0 = time.perf_counter()
        if self._closed:
            return Released(stop=self._blocked)
        if self._t_first is None:
            self._t_first = t0
        released = Released()
        if not self._identity:
            if self._phase == "reasoning":  # the token cap came inside the reasoning
                released = await self._run([], final=True, reasoning=True)
            if not released.stop:
                released.extend(await self._run([], final=True))
        released = self._done(t0, released)
        await self.aclose()
        return released

    async def aclose(self) -> None:
        """End the request (once): record its metrics, let every filter free its per-request state."""
        if self._closed:
            return
        self._closed = True
        # Recorded here, off the token path: the first record in a process can be slow (it sets up the backend).
        for seconds in self._overheads:
            HOOK_OVERHEAD.observe(seconds)
        if self.first_release_s is not None:
            HOOK_TIME_TO_FIRST_RELEASE.observe(self.first_release_s)
        if self._started:
            for run in self._links:
                await run.stop()

    def _begin_generation(self) -> None:
        opened = self._tags is not None and self._tags.opened_by_prompt
        self._phase = "reasoning" if opened else "start"

    def _channel(self, token_id: int) -> str:
        """Where a Thinker token belongs: "open" or "close" (the reasoning's tags), "reasoning" or "answer"."""
        tags = self._tags
        if tags is None:
            return "answer"
        if self._phase == "start":
            self._phase = "reasoning" if token_id == tags.open_id else "answer"
            return "open" if token_id == tags.open_id else "answer"
        if self._phase == "reasoning" and token_id == tags.close_id:
            self._phase = "answer"
            return "close"
        return self._phase

    async def _run(self, pieces: list[Piece], final: bool, reasoning: bool = False) -> Released:
        """Pieces of the answer (or of its reasoning) through the chain; `final`: that text is complete."""
        try:
            if not self._started:
                self._started = True
                for run in self._links:
                    await run.start()
            calls: list[ToolCall] = []
            if self._scanner is not None and not reasoning:
                pieces, calls = self._scan(pieces, final)
            ids = self._reasoning_ids if reasoning else self._ids
            text = ""
            for p in pieces:
                ids.add(p)
                text += p.text
            for run in self._links:
                run.turn.reasoning = reasoning
                text = await (run.end(text) if final else run.push(text))
            if reasoning:
                return Released(events=self._take_events(), reasoning=text, reasoning_ids=ids.release(text))
            return Released(ids.release(text), text, self._take_events(), tool_calls=calls)
        except _Blocked as b:
            return await self._block(b)
        except FilterFailed:
            await self.aclose()
            raise

    def _scan(self, pieces: list[Piece], final: bool) -> tuple[list[Piece], list[ToolCall]]:
        out, calls = [], []
        for p in pieces:
            released, found = self._scanner.push(p)
            out += released
            calls += found
        if final:
            held, unterminated = self._scanner.finish()
            out += held
            if unterminated is not None:
                self._events.append(HookEvent("tools", "tool_call_unterminated",
                                              "the answer ended inside a tool call; it was not run"))
        for call in calls:
            self._events.append(HookEvent("tools", "tool_call", call.error or "",
                                          {"name": call.name, "arguments": call.arguments}))
        return out, calls

    async def _block(self, b: _Blocked) -> Released:
        fallback = self.chain.fallback if b.verdict.fallback is None else b.verdict.fallback
        if self._last_char and not self._last_char.isspace() and not fallback[:1].isspace():
            fallback = " " + fallback  # after "Sure." comes " Sorry, ...", not "Sure.Sorry, ..."
        self._events.append(HookEvent(b.link, "blocked", b.verdict.reason))
        self._blocked = True
        return Released(self._ids.encode_only(fallback), fallback, self._take_events(), stop=True)

    def _take_events(self) -> list[HookEvent]:
        events, self._events[:] = list(self._events), []
        return events

    @property
    def overhead_s(self) -> float:
        """Time spent in feed/finish so far."""
        return sum(self._overheads)

    def _done(self, t0: float, released: Released) -> Released:
        now = time.perf_counter()
        self._overheads.append(now - t0)
        if released.text:
            self._last_char = released.text[-1]
        if (released.text or released.reasoning) and self.first_release_s is None:
            self.first_release_s = now - self._t_first
        return released


class _LinkRun:
    """One link for one request: its look-ahead window, the text it holds, its turn, its error policy."""

    def __init__(self, link: Link, ctx: HookContext, events: list[HookEvent]):
        self.link = link
        self.turn = FilterTurn(link.name, ctx, events)
        self.window: deque[str] = deque()
        self.held = ""
        self.bypassed = False

    async def start(self) -> None:
        try:
            await self.link.filter.start(self.turn)
        except Exception as e:
            self._failed(e)

    async def push(self, text: str) -> str:
        if text:
            self.window.append(text)
        out = ""
        while len(self.window) > self.link.lookahead:
            out += await self._decide(self.window.popleft())
        return out

    async def end(self, text: str) -> str:
        out = await self.push(text)
        while self.window:
            out += await self._decide(self.window.popleft())
        return out + await self._decide(None)

    async def stop(self) -> None:
        try:
            await self.link.filter.stop(self.turn)
        except Exception:  # the request is over either way
            log.warning("text filter %r failed to stop", self.link.name, exc_info=True)

    async def _decide(self, piece: str | None) -> str:
        """Ask the filter about its held text plus `piece` (None: the end of the answer)."""
        if self.bypassed:
            return piece or ""
        text, self.held = self.held + (piece or ""), ""
        self.turn.ahead = "".join(self.window)
        f = self.link.filter
        try:
            verdict = await (f.on_end(text, self.turn) if piece is None else f.on_text(text, self.turn))
            if not isinstance(verdict, Release | Hold | Block):
                raise TypeError(f"expected Release, Hold or Block, got {verdict!r}")
        except Exception as e:
            self._failed(e)
            return text
        if isinstance(verdict, Block):
            raise _Blocked(self.link.name, verdict)
        if isinstance(verdict, Hold):
            self.held = "" if piece is None else text
            return ""
        self.held = "" if piece is None else verdict.keep
        return verdict.text

    def _failed(self, e: Exception) -> None:
        """Apply the link's error policy: raise FilterFailed, or bypass the filter for the rest of the request."""
        why = f"{type(e).__name__}: {e}"
        if self.link.on_error == "fail":
            raise FilterFailed(f"text filter {self.link.name!r} failed: {why}") from e
        log.warning("text filter %r failed; skipping it for the rest of request %r", self.link.name,
                    self.turn.ctx.request_id, exc_info=True)
        self.bypassed = True
        self.turn.emit("filter_skipped", f"the filter failed and is skipped from now on: {why}")


class _Decoder:
    """Token ids -> text pieces; ids that end inside a multi-byte character wait for the rest of it, so the text is
    exactly `services.text.Detokenizer`'s, decoding only the new ids."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []

    def push(self, token_id: int) -> Piece | None:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return None
        piece, self._ids = Piece(text, self._ids), []
        return piece


class _IdMapper:
    """Token ids of released text: the Thinker's own while the released text is the Thinker's text (filters only
    delayed it), so ids are never re-encoded needlessly; the encoding of the text once a filter changed it."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._pending: deque[Piece] = deque()  # the Thinker's pieces not released yet
        self._aligned = True

    def add(self, piece: Piece) -> None:
        if self._aligned:
            self._pending.append(piece)

    def release(self, text: str) -> list[int]:
        if self._aligned and "".join(p.text for p in self._pending).startswith(text):
            ids, rest = [], text
            while rest:
                p = self._pending[0]
                if len(p.text) <= len(rest):
                    ids += self._encode(p.text) if p.ids is None else p.ids
                    rest = rest[len(p.text):]
                    self._pending.popleft()
                else:  # the release ends inside a piece: its parts lose the piece's ids
                    ids += self._encode(rest)
                    self._pending[0] = Piece(p.text[len(rest):], None)
                    rest = ""
            while self._pending and not self._pending[0].text:  # special tokens right after it (a stop token)
                ids += self._pending.popleft().ids
            return ids
        return self.encode_only(text)

    def encode_only(self, text: str) -> list[int]:
        """Text the Thinker did not write: from now on, every release is re-encoded."""
        self._aligned = False
        self._pending.clear()
        return self._encode(text)

    def _encode(self, text: str) -> list[int]:
        # split_special_tokens: released text that spells "<|im_end|>" is spoken as text, not as the token
        return self._tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []
