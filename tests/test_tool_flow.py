"""Issue 5's tool-call flow through the conductor, driven by a scripted Thinker (the random tiny model never writes
a tool call): the tool runs, the continuation reaches the Thinker with the tool response in its prompt, and nothing
of the call is released to the client or the Talker."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from services.conductor import Conductor, TurnRequest
from services.engines.bundle import Engines
from services.engines.sampling import SamplingParams
from services.events import TextDelta, TurnSummary
from services.hooks import FilterChain, ToolRegistry, python_tool
from services.stages import Stages, ThinkerToken
from services.turn_parts import text_part
from tests.helpers import SpyTalker

CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Lisbon"}}\n</tool_call>'
ANSWER = "It is sunny in Lisbon today."


class ScriptedThinker:
    """Writes one scripted text per generation, then the stop token; remembers every prompt it was given."""

    def __init__(self, tokenizer, scripts: list[str], stop_id: int):
        self.tokenizer, self.scripts, self.stop_id = tokenizer, scripts, stop_id
        self.prompts: list[str] = []

    async def generate(self, prompt, sampling, max_new_tokens, stop_ids, embed=None):
        self.prompts.append(self.tokenizer.decode(prompt.input_ids))
        script = self.scripts[len(self.prompts) - 1]
        for token in self.tokenizer.encode(script) + [self.stop_id]:
            yield ThinkerToken(token)


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return Engines.load(tiny_ckpt)


def test_tool_call_runs_and_the_thinker_continues_with_its_result(engines):
    calls = []

    def weather(city: str) -> dict:
        """Current weather for a city."""
        calls.append(city)
        return {"city": city, "sky": "sunny"}

    stages = Stages.local(engines)
    tokenizer = engines.processor.tokenizer
    thinker = ScriptedThinker(tokenizer, [CALL, ANSWER], min(stages.stop_ids))
    talker = SpyTalker(stages.talker)
    chain = FilterChain([], tools=ToolRegistry([python_tool(
        weather, parameters={"type": "object", "properties": {"city": {"type": "string"}}})]))
    conductor = Conductor(dataclasses.replace(stages, thinker=thinker, talker=talker), hooks=chain)

    async def run():
        return [e async for e in conductor.run(TurnRequest(
            parts=[text_part("What's the weather in Lisbon?")], max_new_tokens=64, max_audio_frames=30,
            thinker_sampling=SamplingParams(greedy=True)))]

    events = asyncio.run(run())
    summary = events[-1]
    assert isinstance(summary, TurnSummary)
    assert calls == ["Lisbon"]
    assert len(thinker.prompts) == 2
    assert '"name": "weather"' in thinker.prompts[0]  # the tool was declared to the Thinker
    continuation = thinker.prompts[1]
    assert '<tool_response>\n{"city": "Lisbon", "sky": "sunny"}\n</tool_response>' in continuation
    assert continuation.rstrip().endswith("<|im_start|>assistant")
    # The Thinker goes on from its own tokens: the first prompt, the call as written, its stop token, the tool turn.
    assert continuation.startswith(thinker.prompts[0] + CALL + "<|im_end|>\n<|im_start|>user\n<tool_response>")
    client_text = "".join(e.text for e in events if isinstance(e, TextDelta))
    heard = tokenizer.decode(talker.received)
    for released in (client_text, summary.text, heard):
        assert "tool_call" not in released and "weather" not in released
    assert client_text == summary.text == ANSWER
    assert heard == ANSWER
    assert summary.codes  # the answer was spoken
