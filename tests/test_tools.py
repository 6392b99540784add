"""Tool calls in the Thinker's text stream (never released), running tools, the continuation prompt, and the
`retrieve` RAG tool over a JSONL corpus."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.errors import InvalidInput
from services.hooks import (
    BM25Retriever,
    FilterChain,
    HookContext,
    Passage,
    Retrieve,
    ToolCall,
    ToolRegistry,
    build_chain,
    python_tool,
    run_tools,
)
from services.hooks.tools import Piece, ToolCallScanner, continuation_text

IM_END, TOOL_CALL, TOOL_RESPONSE = 151645, 151657, 151665
CORPUS = [
    {"id": "paris", "text": "Paris is the capital and largest city of France."},
    {"id": "berlin", "text": "Berlin is the capital of Germany."},
    {"id": "zurich", "text": "Zürich ist die größte Stadt der Schweiz."},
    {"id": "python", "text": "Python is a programming language created by Guido van Rossum."},
]
CALL = '<tool_call>\n{"name": "retrieve", "arguments": {"query": "capital of France"}}\n</tool_call>'


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in CORPUS) + "\n\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


def ids_of(tok, text):
    return tok.encode(text, add_special_tokens=False)


async def feed_all(session, ids):
    return [await session.feed(i) for i in ids]


def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


class FixedStore:
    """A stand-in for a user's vector store."""

    def __init__(self, answer: str):
        self.answer = answer

    def search(self, query: str, k: int) -> list[Passage]:
        return [Passage("only", f"{self.answer} ({query})", 1.0)][:k]


# --- the flow --------------------------------------------------------------------------------------------------------


async def test_tool_call_flow(processor, tok, corpus):
    chain = build_chain({"tools": [{"use": "services.hooks.tools:Retrieve", "options": {"corpus": str(corpus),
                                                                                       "k": 1}}]})
    user = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    ctx = HookContext(request_id="r", conversation=user)
    session = chain.session(ctx, tok)

    step = ids_of(tok, "Let me look that up.\n" + CALL) + [IM_END]
    outs = await feed_all(session, step)
    cut = step.index(TOOL_CALL)
    assert "".join(o.text for o in outs) == "Let me look that up.\n"  # nothing of the call
    assert [i for o in outs for i in o.token_ids] == step[:cut] + [IM_END]  # the Thinker's own ids
    calls = [c for o in outs for c in o.tool_calls]
    assert calls == [ToolCall("retrieve", {"query": "capital of France"})]
    assert outs[step.index(TOOL_CALL + 1)].tool_calls == calls  # returned with `</tool_call>`
    assert [(e.hook, e.type, e.data["name"]) for o in outs for e in o.events] == [("tools", "tool_call", "retrieve")]

    messages = await run_tools(calls, chain.tools, ctx)
    assert [m["role"] for m in messages] == ["tool"]
    assert [hit["id"] for hit in json.loads(messages[0]["content"])] == ["paris"]

    # The continuation: the step as the Thinker wrote it, then the tool results, then a new assistant turn.
    conversation = user + [{"role": "assistant", "content": tok.decode(step, skip_special_tokens=True)}] + messages
    prompt = processor.apply_chat_template(conversation, tools=chain.tools.schemas(), add_generation_prompt=True,
                                           tokenize=False)
    assert "<tools>" in prompt and '"name": "retrieve"' in prompt
    assert CALL in prompt
    assert f"<tool_response>\n{messages[0]['content']}\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert TOOL_RESPONSE in processor(text=prompt, return_tensors="pt")["input_ids"][0].tolist()

    # The Thinker's answer goes through the same session: the user hears the preamble and the answer only.
    answer = ids_of(tok, "Paris is the capital of France.") + [IM_END]
    outs += await feed_all(session, answer)
    outs.append(await session.finish())
    assert "".join(o.text for o in outs) == "Let me look that up.\nParis is the capital of France."


async def test_tool_calls_split_into_pieces_are_found(tok):
    chain = FilterChain(tools=ToolRegistry([python_tool(add)]))
    text = 'a < b, <tool<x> <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> c'
    ids = [i for ch in text for i in ids_of(tok, ch)]  # "<tool_call>" as plain characters, split everywhere
    session = chain.session(HookContext(), tok)
    outs = await feed_all(session, ids)
    outs.append(await session.finish())
    assert "".join(o.text for o in outs) == "a < b, <tool<x>  c"
    # the pieces around the call are whole: the Thinker's own ids, even for "<" and "<tool" held for a while
    assert [i for o in outs for i in o.token_ids] == [i for ch in "a < b, <tool<x>  c" for i in ids_of(tok, ch)]
    assert [c for o in outs for c in o.tool_calls] == [ToolCall("add", {"a": 1, "b": 2})]


async def test_several_calls_malformed_and_unterminated(tok):
    chain = FilterChain(tools=ToolRegistry([python_tool(add)]))
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\n<tool_call>{"name": "add", '
            '"arguments": "{\\"a\\": 2, \\"b\\": 2}"}</tool_call><tool_call>not json</tool_call>ok<tool_call>{"na')
    session = chain.session(HookContext(), tok)
    outs = await feed_all(session, ids_of(tok, text))
    outs.append(await session.finish())
    assert "".join(o.text for o in outs) == "\nok"
    calls = [c for o in outs for c in o.tool_calls]
    assert calls[:2] == [ToolCall("add", {"a": 1, "b": 2}), ToolCall("add", {"a": 2, "b": 2})]
    assert calls[2].error.startswith("the tool call is not valid JSON")
    assert outs[-1].events[-1].type == "tool_call_unterminated"
    contents = [m["content"] for m in await run_tools(calls, chain.tools, HookContext())]
    assert contents[:2] == ["3", "4"] and "not valid JSON" in json.loads(contents[2])["error"]


def test_scanner_splits_a_piece_after_the_closing_tag():
    scanner = ToolCallScanner()
    assert scanner.push(Piece("hi <tool_", [1, 2])) == ([], [])
    assert scanner.push(Piece('call>{"name": "f"}</tool_call> there', [3])) == (
        [Piece("hi ", None), Piece(" there", None)], [ToolCall("f", {})])
    assert scanner.push(Piece("<", [4])) == ([], []) and scanner.finish() == ([Piece("<", [4])], None)


async def test_run_tools_answers_every_failure_as_an_error():
    async def slow():
        await asyncio.sleep(10)

    def broken(x):
        raise ValueError(f"bad {x}")

    async def hello(name: str):
        return {"greeting": f"héllo {name}"}

    registry = ToolRegistry([python_tool(slow, timeout_s=0.1), python_tool(broken), python_tool(hello)])
    calls = [ToolCall("slow", {}), ToolCall("broken", {"x": 1}), ToolCall("nope", {}), ToolCall("hello", {"name": "a"}),
             ToolCall("hello", {"wrong": 1})]
    contents = [m["content"] for m in await run_tools(calls, registry, HookContext())]
    errors = [json.loads(c).get("error", "") for c in contents]
    assert "within 0.1 s" in errors[0] and "ValueError: bad 1" in errors[1] and "unknown tool 'nope'" in errors[2]
    assert contents[3] == '{"greeting": "héllo a"}' and "TypeError" in errors[4]
    with pytest.raises(InvalidInput, match="two tools"):
        ToolRegistry([python_tool(add), python_tool(add)])


# --- tools from the config -------------------------------------------------------------------------------------------


def test_tools_from_config(corpus):
    chain = build_chain({"max_tool_steps": 3, "tools": [
        {"use": f"{__name__}:add", "name": "plus",
         "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}},
        {"use": "services.hooks.tools:Retrieve", "name": "kb",
         "options": {"retriever": {"use": f"{__name__}:FixedStore", "options": {"answer": "42"}}}},
        {"name": "remote", "target": "localhost:1", "description": "far away", "parameters": {"type": "object"}},
    ]})
    schemas = {s["function"]["name"]: s["function"] for s in chain.tools.schemas()}
    assert schemas["plus"]["description"] == "Add two numbers." and "a" in schemas["plus"]["parameters"]["properties"]
    assert schemas["kb"]["parameters"]["required"] == ["query"] and schemas["remote"]["description"] == "far away"
    assert chain.max_tool_steps == 3
    assert asyncio.run(run_tools([ToolCall("kb", {"query": "q"})], chain.tools, HookContext()))[0]["content"] == \
        '[{"id": "only", "text": "42 (q)", "score": 1.0}]'
    for bad in [{"use": f"{__name__}:add", "target": "x:1"}, {"target": "x:1", "name": "n"},
                {"use": f"{__name__}:add", "options": {"a": 1}}]:
        with pytest.raises((InvalidInput, ValueError)):
            build_chain({"tools": [bad]})


# --- retrieval -------------------------------------------------------------------------------------------------------


def test_retrieve_over_a_jsonl_corpus(corpus):
    retrieve = Retrieve(str(corpus), k=2)
    hits = retrieve("What is the capital of France?")
    assert hits[0]["id"] == "paris" and hits[0]["score"] > 0 and len(hits) == 2  # Berlin shares "capital"
    assert [h["id"] for h in retrieve("größte Stadt in Zürich")] == ["zurich"]
    assert retrieve("quantum chromodynamics") == []
    assert [h["id"] for h in Retrieve(str(corpus), k=10)("language")] == ["python"]
    assert BM25Retriever([Passage("a", "only one passage")]).search("passage", 5)[0].id == "a"


def test_retrieve_rejects_bad_corpora(tmp_path, corpus):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(InvalidInput, match=r"bad.jsonl:2"):
        Retrieve(str(bad))
    with pytest.raises(InvalidInput, match="cannot read"):
        Retrieve(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InvalidInput, match="either"):
        Retrieve()
    with pytest.raises(InvalidInput, match="either"):
        Retrieve(str(corpus), retriever=FixedStore("x"))


def test_continuation_is_what_the_chat_template_appends_after_the_thinkers_turn(processor):
    tools = [{"type": "function", "function": {"name": "x", "description": "d", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": '<tool_call>\n{"name": "x", "arguments": {}}\n</tool_call>'}]
    results = [{"role": "tool", "content": '{"a": 1}'}]
    text = continuation_text(processor.apply_chat_template, messages, results, tools, stopped=True)
    assert text == '\n<|im_start|>user\n<tool_response>\n{"a": 1}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
    # at the token cap the Thinker never wrote its <|im_end|>: the continuation starts with it
    assert continuation_text(processor.apply_chat_template, messages, results, tools, stopped=False) == \
        "<|im_end|>" + text
    full = processor.apply_chat_template([*messages, *results], tools=tools, add_generation_prompt=True,
                                         tokenize=False)
    before = processor.apply_chat_template(messages, tools=tools, tokenize=False)
    assert full == before[:before.rindex("<|im_end|>") + len("<|im_end|>")] + text

    def rewriting(msgs, **kw):  # a template that renders earlier turns differently once a tool answered
        return "".join(m["role"] + ("!" if len(msgs) > 2 else "") + "<|im_end|>" for m in msgs)

    with pytest.raises(ValueError, match="does not render a tool turn as an append"):
        continuation_text(rewriting, messages, results, tools, stopped=True)
