"""Tool calls in the Thinker's text, and the tools the hook stage runs for them.

The Thinker writes a call in Qwen's format, `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. The
`ToolCallScanner` takes it out of the text stream (nothing of it is ever released) and hands back a `ToolCall`;
`run_tools` runs the calls and answers them as `{"role": "tool"}` messages, which Qwen's chat template renders as
`<tool_response>`; the conductor appends them to the conversation and continues the Thinker.

A tool is a Python callable (`python_tool`) or a gRPC endpoint (`services.hooks.remote.grpc_tool`). `Retrieve` is the
built-in RAG tool: BM25 (bm25s) over a JSONL corpus, or any `Retriever` (a user's vector store).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from services.errors import InvalidInput

if TYPE_CHECKING:
    from services.hooks.sdk import HookContext

log = logging.getLogger(__name__)

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class Piece:
    """A run of the Thinker's text and the token ids it decodes from; `ids=None`: a part of a token's text."""

    text: str
    ids: list[int] | None


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    error: str | None = None  # the call is malformed: it is answered with this error instead of run


def parse_tool_call(body: str) -> ToolCall:
    """The JSON object between `<tool_call>` and `</tool_call>`."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCall("", {}, f"the tool call is not valid JSON: {e}")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return ToolCall("", {}, 'the tool call must be a JSON object with a string "name"')
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            return ToolCall(obj["name"], {}, f"the tool call's arguments are not valid JSON: {e}")
    if not isinstance(arguments, dict):
        return ToolCall(obj["name"], {}, 'the tool call\'s "arguments" must be a JSON object')
    return ToolCall(obj["name"], arguments)


class ToolCallScanner:
    """Splits the Thinker's text into pieces to release and tool calls, which are never released.

    Pieces pass through whole (with their token ids) unless their text could be the start of `<tool_call>`: then
    they wait for the next piece. Only a piece that holds a tag and other text is split (its parts lose their ids).
    """

    def __init__(self):
        self._held: list[Piece] = []
        self._call: str | None = None  # text of the call being written; None outside a call

    def push(self, piece: Piece) -> tuple[list[Piece], list[ToolCall]]:
        out: list[Piece] = []
        calls: list[ToolCall] = []
        self._scan(piece, out, calls)
        return out, calls

    def finish(self) -> tuple[list[Piece], str | None]:
        """The text has ended: the held pieces, and the text of a call left unterminated (None if none)."""
        out, self._held = self._held, []
        call, self._call = self._call, None
        return out, call

    def _scan(self, piece: Piece, out: list[Piece], calls: list[ToolCall]) -> None:
        if self._call is not None:
            self._call += piece.text
            if CLOSE in self._call:
                body, rest = self._call.split(CLOSE, 1)
                self._call = None
                calls.append(parse_tool_call(body))
                if rest:
                    self._scan(Piece(rest, None), out, calls)
            return
        self._held.append(piece)
        text = "".join(p.text for p in self._held)
        if OPEN in text:
            before, after = text.split(OPEN, 1)
            out.extend(_prefix(self._held, len(before)))
            self._held, self._call = [], ""
            if after:
                self._scan(Piece(after, None), out, calls)
        elif not any(text.endswith(OPEN[:k]) for k in range(1, len(OPEN))):
            out.extend(self._held)
            self._held = []


def _prefix(pieces: list[Piece], n: int) -> list[Piece]:
    """The first `n` characters of `pieces`: whole pieces keep their ids, a cut one becomes text only."""
    out = []
    for p in pieces:
        if n <= 0:
            break
        out.append(p if len(p.text) <= n else Piece(p.text[:n], None))
        n -= len(p.text)
    return out


# --- tools -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A tool the Thinker may call: its schema for the chat template and how to run it."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    call: Callable[[dict[str, Any], HookContext], Awaitable[Any]]  # (arguments, request context) -> result
    timeout_s: float = 30.0

    def schema(self) -> dict[str, Any]:
        """The declaration Qwen's chat template renders in the system prompt's `<tools>`."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def python_tool(fn: Callable[..., Any], *, name: str | None = None, description: str | None = None,
                parameters: dict[str, Any] | None = None, timeout_s: float = 30.0) -> Tool:
    """A tool of a Python callable, called with the call's arguments as keywords. A coroutine function is awaited;
    a plain one runs in a worker thread (it may block on I/O). Name, description and parameters default to the
    callable's `name`, `description` and `parameters` attributes, then its `__name__` and docstring."""
    name = name or getattr(fn, "name", None) or getattr(fn, "__name__", None)
    if not name:
        raise InvalidInput(f"tool {fn!r} has no name: give one")
    description = description or getattr(fn, "description", None) or inspect.getdoc(fn) or ""
    parameters = parameters or getattr(fn, "parameters", None) or {"type": "object", "properties": {}}
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))

    async def call(arguments: dict[str, Any], ctx: HookContext) -> Any:
        return await fn(**arguments) if is_async else await asyncio.to_thread(fn, **arguments)

    return Tool(name, description, parameters, call, timeout_s)


class ToolRegistry:
    """The tools of a deployment, by name."""

    def __init__(self, tools: Iterable[Tool] = ()):
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.name in self._tools:
                raise InvalidInput(f"two tools are named {tool.name!r}")
            self._tools[tool.name] = tool

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def schemas(self) -> list[dict[str, Any]]:
        """The `tools` argument of the chat template (`apply_chat_template(messages, tools=...)`)."""
        return [t.schema() for t in self._tools.values()]


async def run_tools(calls: Sequence[ToolCall], registry: ToolRegistry, ctx: HookContext) -> list[dict[str, str]]:
    """Run the calls concurrently; one `{"role": "tool", "content": ...}` message per call, in order. A malformed
    call, an unknown tool, a tool that raises or times out is answered with `{"error": ...}`, so the Thinker can
    recover; the turn goes on."""
    contents = await asyncio.gather(*(_run_one(c, registry, ctx) for c in calls))
    return [{"role": "tool", "content": c} for c in contents]


async def _run_one(call: ToolCall, registry: ToolRegistry, ctx: HookContext) -> str:
    if call.error is not None:
        return _error(call.error)
    tool = registry.get(call.name)
    if tool is None:
        known = ", ".join(s["function"]["name"] for s in registry.schemas())
        return _error(f"unknown tool {call.name!r}; tools: {known}")
    try:
        async with asyncio.timeout(tool.timeout_s):
            result = await tool.call(call.arguments, ctx)
    except TimeoutError:
        return _error(f"tool {call.name!r} did not answer within {tool.timeout_s:g} s")
    except Exception as e:  # the tool's own failure: the Thinker reads it and the turn goes on
        log.warning("tool %r failed", call.name, exc_info=True)
        return _error(f"tool {call.name!r} failed: {type(e).__name__}: {e}")
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


IM_END = "<|im_end|>"


def continuation_text(render: Callable[..., str], messages: Sequence[dict], tool_messages: Sequence[dict],
                      tools: list[dict] | None, stopped: bool) -> str:
    """What follows the Thinker's own tokens so that it goes on after a tool step: the end of its turn, the tool
    turn in Qwen's `<tool_response>` form and a new assistant header. `messages` ends with the assistant message
    that holds the call; `render` is the checkpoint's chat template (`apply_chat_template`, tokenize=False).

    The Thinker's prompt grows by its generated ids plus this text's ids, so what it wrote is never re-tokenized and
    a server may keep its KV cache. `stopped`: the Thinker wrote its stop token (<|im_end|>) itself; if it hit the
    token cap instead, the text starts with that token."""
    before = render(list(messages), tools=tools, add_generation_prompt=False, tokenize=False)
    after = render([*messages, *tool_messages], tools=tools, add_generation_prompt=True, tokenize=False)
    cut = before.rfind(IM_END)
    if cut < 0 or not after.startswith(before[:cut + len(IM_END)]):
        raise ValueError("the chat template does not render a tool turn as an append to the conversation")
    return ("" if stopped else IM_END) + after[cut + len(IM_END):]


def _error(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


# --- retrieval (RAG) -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    id: str
    text: str
    score: float = 0.0


class Retriever(Protocol):
    """What `Retrieve` searches: BM25 over a corpus here, a user's vector store elsewhere. `search` may block (it
    runs in a worker thread)."""

    def search(self, query: str, k: int) -> list[Passage]: ...


class BM25Retriever:
    """Lexical search with bm25s (Lucene's BM25 variant); passages that share no term with the query are left out."""

    def __init__(self, passages: Sequence[Passage], stopwords: str | None = "en"):
        import bm25s

        if not passages:
            raise InvalidInput("the retrieval corpus is empty")
        self.passages = list(passages)
        self._tokenizer = bm25s.tokenization.Tokenizer(stopwords=stopwords)
        self._bm25 = bm25s.BM25()
        self._bm25.index(self._tokenizer.tokenize([p.text for p in self.passages], show_progress=False),
                         show_progress=False)

    @classmethod
    def from_jsonl(cls, path: str | Path, text_field: str = "text", id_field: str = "id",
                   stopwords: str | None = "en") -> BM25Retriever:
        """One JSON object per line with a text field and, optionally, an id (default: the line number)."""
        passages = []
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InvalidInput(f"cannot read the retrieval corpus {path}: {e}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                passages.append(Passage(str(obj.get(id_field, n)), obj[text_field]))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise InvalidInput(f"{path}:{n}: expected a JSON object with a {text_field!r} field") from None
        return cls(passages, stopwords)

    def search(self, query: str, k: int) -> list[Passage]:
        tokens = self._tokenizer.tokenize([query], update_vocab=False, show_progress=False)
        docs, scores = self._bm25.retrieve(tokens, k=min(k, len(self.passages)), show_progress=False)
        return [Passage(self.passages[d].id, self.passages[d].text, round(float(s), 4))
                for d, s in zip(docs[0], scores[0]) if s > 0]


class Retrieve:
    """The `retrieve` tool: the passages of a knowledge base most relevant to a query, for grounded answers."""

    name = "retrieve"
    description = "Search the knowledge base and return the passages most relevant to a query."
    parameters = {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "what to look for, in a few words"}},
        "required": ["query"],
    }

    def __init__(self, corpus: str | None = None, *, retriever: Retriever | None = None, k: int = 3,
                 text_field: str = "text", id_field: str = "id", stopwords: str | None = "en"):
        if (corpus is None) == (retriever is None):
            raise InvalidInput("retrieve: give either a JSONL `corpus` or a `retriever`")
        if k < 1:
            raise InvalidInput(f"retrieve: k must be at least 1, got {k}")
        self.k = k
        self.retriever = retriever or BM25Retriever.from_jsonl(corpus, text_field, id_field, stopwords)

    def __call__(self, query: str) -> list[dict[str, Any]]:
        return [{"id": p.id, "text": p.text, "score": p.score} for p in self.retriever.search(query, self.k)]
