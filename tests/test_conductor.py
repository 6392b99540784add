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
from services.stages import Stages, ThinkerToken
from services.turn_parts import audio_part, image_part, text_part, video_part
from tests.helpers import SpyTalker, a_word, reference_inputs

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


def conversation(req: TurnRequest) -> list[dict]:
    """The request as the chat messages a reference user writes: system, history, then the turn's parts as given."""
    history = list(req.history)
    if req.system is not None:
        history = [{"role": "system", "content": req.system}] + [m for m in history if m["role"] != "system"]
    return history + [{"role": "user", "content": list(req.parts)}]


def reference_run(reference, processor, req: TurnRequest):
    """The reference's greedy output on the conversation, preprocessed by the reference's own processor (not by
    `build_turn`): (generated ids, codes [T, 16] or None)."""
    inputs = reference_inputs(processor, conversation(req))
    captured = {}
    original = reference.code2wav.chunked_decode if reference.has_talker else None  # a Thinking checkpoint's has none

    def capture(codes, *a, **k):
        captured["codes"] = codes
        return original(codes, *a, **k)

    if original is not None:
        reference.code2wav.chunked_decode = capture
    try:
        # The reference hands `use_audio_in_video` to its Thinker only, so its Talker would place a video's
        # interleaved audio and frames as if they were separate (issue 9's notes); its talker_ kwargs pass it on.
        track = {"talker_use_audio_in_video": True} if inputs.get("use_audio_in_video") else {}
        out = reference.generate(
            **inputs, speaker=req.speaker, return_audio=req.audio_output,
            thinker_max_new_tokens=req.max_new_tokens, talker_max_new_tokens=req.max_audio_frames,
            thinker_do_sample=False, talker_do_sample=False, **track,
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
    req = TurnRequest(parts=[text_part("Hello world, this is Qwen.")], max_new_tokens=12, max_audio_frames=40,
                      thinker_sampling=GREEDY)
    events = collect(conductor, req)
    summary = assert_parity(reference, processor, events, req)
    for key in ("time_to_first_text_s", "time_to_first_audio_s", "total_s", "rtf", "thinker_ttft_s",
                "talker_ttft_s", "code2wav_ttft_s", "preprocess_s"):
        assert summary.timings[key] > 0, key


def test_audio_input(reference, processor, conductor, media):
    req = TurnRequest(parts=[audio_part(media["audio"]), text_part("What do you hear?")], max_new_tokens=10,
                      max_audio_frames=30, thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_image_input(reference, processor, conductor, media):
    req = TurnRequest(parts=[image_part(media["image"]), text_part("Describe it.")], max_new_tokens=10,
                      max_audio_frames=30, thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_audio_and_image_input(reference, processor, conductor, media):
    req = TurnRequest(parts=[audio_part(media["audio"]), image_part(media["image"]), text_part("Both?")],
                      max_new_tokens=10, max_audio_frames=30, thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_three_turn_conversation_with_system_prompt(reference, processor, conductor, media):
    history = [
        {"role": "user", "content": [{"type": "audio", "audio": media["audio"]},
                                     {"type": "text", "text": "Listen to this."}]},
        {"role": "assistant", "content": "I hear a rising tone."},
        {"role": "user", "content": "Is it loud?"},
        {"role": "assistant", "content": "Not very."},
    ]
    req = TurnRequest(parts=[text_part("Thanks, describe it once more.")], history=history, system="You are terse.",
                      max_new_tokens=10, max_audio_frames=30, thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


# ---- a turn's parts in the order given (issue 9): the prompt is the chat template over exactly those parts ----


def tone(seconds: float, freq: float) -> dict:
    """A second audio, unlike the chirp: a raw 16 kHz PCM part."""
    t = np.arange(int(seconds * 16000)) / 16000
    return audio_part((0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sample_rate=16000)


def test_image_before_audio(reference, processor, conductor, media):
    """The issue's case: a system prompt and a user turn of image, audio, text, which regrouping (audio first)
    answered differently from the reference."""
    parts = [image_part(media["image"]), audio_part(media["audio"]), text_part("What do these show?")]
    req = TurnRequest(parts=parts, system="You are terse.", max_new_tokens=10, max_audio_frames=30,
                      thinker_sampling=GREEDY)
    summary = assert_parity(reference, processor, collect(conductor, req), req)
    regrouped = TurnRequest(parts=[parts[1], parts[0], parts[2]], system="You are terse.", max_new_tokens=10,
                            max_audio_frames=30, thinker_sampling=GREEDY)
    assert reference_run(reference, processor, regrouped)[0] != summary.thinker_token_ids  # the order matters


def test_text_between_two_images(reference, processor, conductor, media):
    from PIL import Image

    wide = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 128, 3), dtype=np.uint8))
    req = TurnRequest(parts=[text_part("This one: "), image_part(media["image"]), text_part(" and this one: "),
                             image_part(wide), text_part(". Which is wider?")],
                      max_new_tokens=10, max_audio_frames=30, thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_two_audios_around_an_image(reference, processor, conductor, media):
    req = TurnRequest(parts=[audio_part(media["audio"]), image_part(media["image"]), tone(0.8, 330.0),
                             text_part("Which sound fits the picture?")],
                      max_new_tokens=10, max_audio_frames=30, thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_a_video_with_its_sound_track_after_text(reference, processor, conductor, media):
    from pathlib import Path

    from PIL import Image

    frames = [Image.open(f).convert("RGB") for f in sorted(Path(media["video"]).iterdir())]
    t = np.arange(16000) / 16000
    track = (0.3 * np.sin(2 * np.pi * 250 * t)).astype(np.float32)
    video = {"frames": frames, "timestamps": [0.0, 0.5], "audio": track, "audio_sample_rate": 16000}
    req = TurnRequest(parts=[text_part("What happens here? "), video_part(video)], max_new_tokens=10,
                      max_audio_frames=30, thinker_sampling=GREEDY)
    summary = assert_parity(reference, processor, collect(conductor, req), req)
    assert len(summary.codes) > 0


def test_multi_turn_history_with_media_in_several_orders(reference, processor, conductor, media):
    history = [
        {"role": "user", "content": [image_part(media["image"]), text_part("Remember this picture, then "),
                                     audio_part(media["audio"])]},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": [text_part("And this: "), tone(0.6, 500.0), text_part(" too.")]},
        {"role": "assistant", "content": "Noted as well."},
    ]
    req = TurnRequest(parts=[audio_part(media["audio"]), text_part("Is it the first sound? Look again: "),
                             image_part(media["image"])],
                      history=history, system="You are terse.", max_new_tokens=10, max_audio_frames=30,
                      thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


@pytest.mark.parametrize("speaker", ["chelsie", "ethan", "aiden"])
def test_every_speaker(reference, processor, conductor, speaker):
    req = TurnRequest(parts=[text_part("Say something.")], speaker=speaker, max_new_tokens=6, max_audio_frames=20,
                      thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_long_answer_beyond_300_frames(reference, processor, conductor):
    req = TurnRequest(parts=[text_part("Tell me a long story.")], max_new_tokens=40, max_audio_frames=330,
                      thinker_sampling=GREEDY)
    summary = assert_parity(reference, processor, collect(conductor, req), req)
    assert len(summary.codes) > 300


def test_text_only_output(reference, processor, conductor):
    req = TurnRequest(parts=[text_part("Just text, please.")], audio_output=False, max_new_tokens=12,
                      thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_audio_starts_before_the_thinker_finishes(conductor):
    """Streaming: the first audio packet leaves before the last text delta."""
    req = TurnRequest(parts=[text_part("Stream it.")], max_new_tokens=40, max_audio_frames=60, thinker_sampling=GREEDY)
    events = collect(conductor, req)
    kinds = [type(e) for e in events]
    first_audio = kinds.index(AudioChunk)
    last_text = len(kinds) - 1 - kinds[::-1].index(TextDelta)
    assert first_audio < last_text


@pytest.mark.parametrize("req, message", [
    (TurnRequest(parts=[text_part("hi")], speaker="nobody"), "unknown speaker"),
    (TurnRequest(parts=[text_part("hi")], max_new_tokens=0), "max_new_tokens"),
    (TurnRequest(), "empty turn"),
])
def test_bad_requests_are_clear_errors(conductor, req, message):
    with pytest.raises(InvalidInput, match=message):
        collect(conductor, req)


def test_cancel_frees_state_and_next_turn_is_unaffected(reference, processor, conductor):
    async def cancel_after_first_audio():
        agen = conductor.run(TurnRequest(parts=[text_part("Long one.")], max_new_tokens=40, max_audio_frames=200,
                                         thinker_sampling=GREEDY))
        async for event in agen:
            if isinstance(event, AudioChunk):
                break
        await agen.aclose()
        await asyncio.sleep(0.1)  # let asyncio finalize the stages' async generators
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]

    leftover = asyncio.run(cancel_after_first_audio())
    assert leftover == []
    req = TurnRequest(parts=[text_part("Hello world, this is Qwen.")], max_new_tokens=8, max_audio_frames=20,
                      thinker_sampling=GREEDY)
    assert_parity(reference, processor, collect(conductor, req), req)


def test_stage_and_turn_metrics_are_recorded(conductor, media):
    from prometheus_client import REGISTRY

    def count(name, **labels):
        return REGISTRY.get_sample_value(name, labels) or 0.0

    stages = ["audio_encoder", "vision_encoder", "thinker", "talker", "mtp", "code2wav"]
    before = {s: count("omni_stage_ttft_seconds_count", stage=s) for s in stages}
    first_audio = count("omni_time_to_first_audio_seconds_count")
    req = TurnRequest(parts=[audio_part(media["audio"]), image_part(media["image"]), text_part("Both?")],
                      max_new_tokens=6, max_audio_frames=10, thinker_sampling=GREEDY)
    collect(conductor, req)
    for s in stages:
        assert count("omni_stage_ttft_seconds_count", stage=s) > before[s], s
    assert count("omni_stage_item_seconds_count", stage="thinker") > 0
    assert count("omni_stage_queue_seconds_count", stage="talker") > 0
    assert count("omni_time_to_first_audio_seconds_count") == first_audio + 1
    errors = count("omni_stage_errors_total", stage="talker", code="InvalidInput")
    with pytest.raises(InvalidInput):
        collect(conductor, TurnRequest(parts=[image_part(b"not an image"), text_part("x" * 10)],
                                       thinker_sampling=GREEDY))
    assert count("omni_stage_errors_total", stage="talker", code="InvalidInput") == errors  # rejected before


def _with_spy(engines, hooks=None):
    import dataclasses

    stages = Stages.local(engines)
    spy = SpyTalker(stages.talker)
    return Conductor(dataclasses.replace(stages, talker=spy), hooks=hooks, stage_timeout_s=120), spy


def test_redacted_word_is_neither_read_nor_heard(engines, processor):
    from services.hooks import FilterChain, HookEvent, Link, Redact

    req = TurnRequest(parts=[text_part("Tell me something.")], max_new_tokens=20, max_audio_frames=40,
                      thinker_sampling=GREEDY)
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

    req = TurnRequest(parts=[text_part("Tell me something.")], max_new_tokens=20, max_audio_frames=40,
                      thinker_sampling=GREEDY)
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

    async def generate(self, *args, **kwargs):
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

    async def generate(self, *args, **kwargs):
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
        collect(conductor, TurnRequest(parts=[text_part("Hi")], max_new_tokens=4, audio_output=False,
                                       thinker_sampling=GREEDY))
