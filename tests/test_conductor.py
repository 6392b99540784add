"""End-to-end parity of the streaming conductor with the reference `generate` (greedy): the same Thinker token
ids, the same codec codes, and a waveform equal to the full Code2Wav forward of those codes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from services.conductor import Conductor, TurnRequest
from services.engines.bundle import Engines
from services.engines.sampling import SamplingParams
from services.errors import InvalidInput
from services.events import AudioChunk, TextDelta, TurnSummary
from services.preprocess import build_turn
from services.stages import Stages, ThinkerToken
from tests.helpers import SpyTalker, a_word

GREEDY = SamplingParams(greedy=True)


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return Engines.load(tiny_ckpt)


@pytest.fixture(scope="module")
def conductor(engines):
    return Conductor(Stages.local(engines), stage_timeout_s=120)


def collect(conductor: Conductor, req: TurnRequest):
    async def go():
        events = [e async for e in conductor.run(req)]
        return events

    events = asyncio.run(go())
    assert isinstance(events[-1], TurnSummary)
    return events


def reference_run(reference, processor, req: TurnRequest):
    """The reference's greedy output on the same processor outputs: (generated ids, codes [T, 16] or None)."""
    inputs = build_turn(processor, history=list(req.history), system=req.system, text=req.text,
                        audios=req.audios, images=req.images).processor_outputs
    captured = {}
    original = reference.code2wav.chunked_decode if reference.has_talker else None  # a Thinking checkpoint's has none

    def capture(codes, *a, **k):
        captured["codes"] = codes
        return original(codes, *a, **k)

    if original is not None:
        reference.code2wav.chunked_decode = capture
    try:
        out = reference.generate(
            **inputs, speaker=req.speaker, return_audio=req.audio_output,
            thinker_max_new_tokens=req.max_new_tokens, talker_max_new_tokens=req.max_audio_frames,
            thinker_do_sample=False, talker_do_sample=False,
        )
    finally:
        if original is not None:
            reference.code2wav.chunked_decode = original
    sequences = out[0] if req.audio_output else (out.sequences if hasattr(out, "sequences") else out)
    generated = sequences[0, inputs["input_ids"].shape[1]:].tolist()
    codes = captured["codes"][0].T if "codes" in captured else None
    return generated, codes


def assert_parity(reference, processor, events, req):
    summary = events[-1]
    ids, codes = reference_run(reference, processor, req)
    assert summary.thinker_token_ids == ids
    # The client's text is the detokenized released tokens.
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text == summary.text == processor.tokenizer.decode(ids, skip_special_tokens=True)
    if not req.audio_output:
        assert not any(isinstance(e, AudioChunk) for e in events) and summary.codes == []
        return summary
    assert torch.equal(torch.tensor(summary.codes), codes)
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    ours = np.concatenate([c.samples for c in chunks])
    with torch.inference_mode():
        full = reference.code2wav(codes.T[None]).reshape(-1).numpy()
    assert ours.shape == full.shape and summary.num_samples == full.size
    np.testing.assert_allclose(ours, full, atol=1e-4)
    return summary


def test_text_only_input(reference, processor, conductor):
    req = TurnRequest(text="Hello world, this is Qwen.", max_new_tokens=12, max_audio_frames=40,
                      thinker_sampling=GREEDY)
    events = collect(conductor, req)
    summary = assert_parity(reference, processor, events, req)
    for key in ("time_to_first_text_s", "time_to_first_audio_s", "total_s", "rtf", "thinker_ttft_s",
                "talker_ttft_s", "code2wav_ttft_s", "preprocess_s"):
        assert summary.timings[key] > 0, key


def test_audio_input(reference, processor, conductor, media):
    req = TurnRequest(text="What do you hear?", audios=[media["audio"]], max_new_tokens=10, max_audio_frames=30,
                      thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_image_input(reference, processor, conductor, media):
    req = TurnRequest(text="Describe it.", images=[media["image"]], max_new_tokens=10, max_audio_frames=30,
                      thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_audio_and_image_input(reference, processor, conductor, media):
    req = TurnRequest(text="Both?", audios=[media["audio"]], images=[media["image"]], max_new_tokens=10,
                      max_audio_frames=30, thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_three_turn_conversation_with_system_prompt(reference, processor, conductor, media):
    history = [
        {"role": "user", "content": [{"type": "audio", "audio": media["audio"]},
                                     {"type": "text", "text": "Listen to this."}]},
        {"role": "assistant", "content": "I hear a rising tone."},
        {"role": "user", "content": "Is it loud?"},
        {"role": "assistant", "content": "Not very."},
    ]
    req = TurnRequest(text="Thanks, describe it once more.", history=history, system="You are terse.",
                      max_new_tokens=10, max_audio_frames=30, thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


@pytest.mark.parametrize("speaker", ["chelsie", "ethan", "aiden"])
def test_every_speaker(reference, processor, conductor, speaker):
    req = TurnRequest(text="Say something.", speaker=speaker, max_new_tokens=6, max_audio_frames=20,
                      thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_long_answer_beyond_300_frames(reference, processor, conductor):
    req = TurnRequest(text="Tell me a long story.", max_new_tokens=40, max_audio_frames=330,
                      thinker_sampling=GREEDY)
    summary = assert_parity(reference, processor, collect(conductor, req), req)
    assert len(summary.codes) > 300


def test_text_only_output(reference, processor, conductor):
    req = TurnRequest(text="Just text, please.", audio_output=False, max_new_tokens=12, thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_audio_starts_before_the_thinker_finishes(conductor):
    """Streaming: the first audio packet leaves before the last text delta."""
    req = TurnRequest(text="Stream it.", max_new_tokens=40, max_audio_frames=60, thinker_sampling=GREEDY)
    events = collect(conductor, req)
    kinds = [type(e) for e in events]
    first_audio = kinds.index(AudioChunk)
    last_text = len(kinds) - 1 - kinds[::-1].index(TextDelta)
    assert first_audio < last_text


@pytest.mark.parametrize("req, message", [
    (TurnRequest(text="hi", speaker="nobody"), "unknown speaker"),
    (TurnRequest(text="hi", max_new_tokens=0), "max_new_tokens"),
    (TurnRequest(), "empty turn"),
])
def test_bad_requests_are_clear_errors(conductor, req, message):
    with pytest.raises(InvalidInput, match=message):
        collect(conductor, req)


def test_cancel_frees_state_and_next_turn_is_unaffected(reference, processor, conductor):
    async def cancel_after_first_audio():
        agen = conductor.run(TurnRequest(text="Long one.", max_new_tokens=40, max_audio_frames=200,
                                         thinker_sampling=GREEDY))
        async for event in agen:
            if isinstance(event, AudioChunk):
                break
        await agen.aclose()
        await asyncio.sleep(0.1)  # let asyncio finalize the stages' async generators
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]

    leftover = asyncio.run(cancel_after_first_audio())
    assert leftover == []
    req = TurnRequest(text="Hello world, this is Qwen.", max_new_tokens=8, max_audio_frames=20,
                      thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_stage_and_turn_metrics_are_recorded(conductor, media):
    from prometheus_client import REGISTRY

    def count(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    stages = ["audio_encoder", "vision_encoder", "thinker", "talker", "mtp", "code2wav"]
    before = {s: count("omni_stage_ttft_seconds_count", stage=s) for s in stages}
    first_audio = count("omni_time_to_first_audio_seconds_count")
    req = TurnRequest(text="Both?", audios=[media["audio"]], images=[media["image"]], max_new_tokens=6,
                      max_audio_frames=10, thinker_sampling=GREEDY)
    collect(conductor, req)
    for s in stages:
        assert count("omni_stage_ttft_seconds_count", stage=s) > before[s], s
    assert count("omni_stage_item_seconds_count", stage="thinker") > 0
    assert count("omni_stage_queue_seconds_count", stage="talker") > 0
    assert count("omni_time_to_first_audio_seconds_count") == first_audio + 1
    errors = count("omni_stage_errors_total", stage="talker", code="InvalidInput")
    with pytest.raises(InvalidInput):
        collect(conductor, TurnRequest(text="x" * 10, images=[b"not an image"], thinker_sampling=GREEDY))
    assert count("omni_stage_errors_total", stage="talker", code="InvalidInput") == errors  # rejected before


def _with_spy(engines, hooks=None):
    import dataclasses

    stages = Stages.local(engines)
    spy = SpyTalker(stages.talker)
    return Conductor(dataclasses.replace(stages, talker=spy), hooks=hooks, stage_timeout_s=120), spy


def test_redacted_word_is_neither_read_nor_heard(engines, processor):
    from services.hooks import FilterChain, HookEvent, Link, Redact

    req = TurnRequest(text="Tell me something.", max_new_tokens=20, max_audio_frames=40, thinker_sampling=GREEDY)
    plain, spy = _with_spy(engines)
    before = collect(plain, req)
    word = a_word(before[-1].text)
    assert word in processor.tokenizer.decode(spy.received)

    chain = FilterChain([Link(Redact(words=[word], replacement="[redacted]"), name="redact")])
    redacting, spy = _with_spy(engines, hooks=chain)
    after = collect(redacting, req)
    summary = after[-1]
    client_text = "".join(e.text for e in after if isinstance(e, TextDelta))
    heard = processor.tokenizer.decode(spy.received)
    assert word not in client_text and word not in heard and word not in summary.text
    assert "[redacted]" in client_text and client_text == summary.text
    assert any(isinstance(e, HookEvent) for e in after)
    assert summary.codes != before[-1].codes  # the Talker spoke different text


def test_blocked_answer_speaks_the_fallback(engines, processor):
    from services.hooks import Blocklist, FilterChain, Link

    req = TurnRequest(text="Tell me something.", max_new_tokens=20, max_audio_frames=40, thinker_sampling=GREEDY)
    plain, _ = _with_spy(engines)
    word = a_word(collect(plain, req)[-1].text)
    chain = FilterChain([Link(Blocklist(words=[word], fallback="I can't talk about that."), name="block")])
    blocking, spy = _with_spy(engines, hooks=chain)
    summary = collect(blocking, req)[-1]
    assert summary.finish_reason == "blocked"
    assert word not in summary.text and "I can't talk about that." in summary.text
    assert word not in processor.tokenizer.decode(spy.received)
    assert "I can't talk about that." in processor.tokenizer.decode(spy.received)


class _Hangs:
    """A stage call that never answers."""

    async def generate(self, *args):
        await asyncio.Event().wait()
        yield  # pragma: no cover

    def open(self, ctx):
        return self

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None

    async def tool_schemas(self):
        return None

    async def feed(self, token_id):
        await asyncio.Event().wait()


class _OneToken:
    """A Thinker that answers at once (a real one may take longer than the short deadline to prefill)."""

    async def generate(self, *args):
        yield ThinkerToken(9707)


@pytest.mark.parametrize("stalled, message", [
    ("thinker", "no output from the thinker within 0.3 s"),
    ("hooks", "no answer from the hook stage within 0.3 s"),
])
def test_a_stalled_stage_fails_the_turn_at_its_deadline(engines, stalled, message):
    import dataclasses

    from services.errors import DeadlineExceeded

    stages = Stages.local(engines)
    if stalled == "thinker":
        conductor = Conductor(dataclasses.replace(stages, thinker=_Hangs()), stage_timeout_s=0.3)
    else:
        conductor = Conductor(dataclasses.replace(stages, thinker=_OneToken()), hooks=_Hangs(), stage_timeout_s=0.3)
    with pytest.raises(DeadlineExceeded, match=message):
        # text only: a waiting Talker would hit its own deadline at about the same time
        collect(conductor, TurnRequest(text="Hi", max_new_tokens=4, audio_output=False, thinker_sampling=GREEDY))
