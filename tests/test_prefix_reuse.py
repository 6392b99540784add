"""Multi-turn prefix reuse (issue 9, point 3): a Thinker replica keeps a session's KV between its turns; the next
turn prefills only what it cannot prove equal (ids one by one, media by content) and encodes only the media past
that prefix; the Talker keeps its earlier turns' user parts the same way. Output stays the reference's, and a lost
or evicted prefix costs a full prefill, same output."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from services.checkpoint.loading import Checkpoint
from services.conductor import Conductor, TurnRequest
from services.config import KVConfig
from services.engines.bundle import Engines
from services.engines.kv_pages import KEEP_NONE, KEEP_TURN, prefill_whole
from services.engines.positions import layout_of
from services.engines.prefix import MarkerIds, ParkedPrefix, expected_reuse, media_bounds, media_segments, \
    reusable_tokens
from services.engines.talker import TEXT_END, TalkerPrompt, default_talker_sampling
from services.engines.thinker import ThinkerEngine, ThinkerPrompt
from services.errors import PrefixGone
from services.events import TurnSummary
from services.preprocess import build_turn
from services.stages import LocalThinker, Stages
from services.turn_parts import audio_part, image_part, text_part, video_part
from tests.test_conductor import GREEDY, assert_parity, tone


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return Engines.load(tiny_ckpt)


class EncoderSpy:
    """An encoder stage that counts the media it is asked to encode."""

    def __init__(self, stage):
        self.stage, self.items = stage, 0

    async def encode(self, data, extra):
        self.items += extra.shape[0]  # audios (feature mask rows) or images/videos (grid rows)
        return await self.stage.encode(data, extra)


def reused_tokens(stage: str = "thinker") -> float:
    return REGISTRY.get_sample_value("omni_stage_prompt_tokens_total", {"stage": stage, "kind": "reused"}) or 0.0


def run(conductor: Conductor, req: TurnRequest) -> list:
    async def go():
        return [e async for e in conductor.run(req)]

    events = asyncio.run(go())
    assert isinstance(events[-1], TurnSummary)
    return events


def prompt_length(processor, req: TurnRequest) -> int:
    return build_turn(processor, history=req.history, system=req.system, parts=req.parts).processor_outputs[
        "input_ids"].shape[1]


def test_a_sessions_turns_reuse_its_kv_encode_only_new_media_and_equal_the_reference(reference, processor, engines,
                                                                                      media):
    stages = Stages.local(engines)
    audio, vision = EncoderSpy(stages.audio), EncoderSpy(stages.vision)
    conductor = Conductor(dataclasses.replace(stages, audio=audio, vision=vision), stage_timeout_s=120)
    turns = [
        [image_part(media["image"]), text_part("Remember this picture, then "), audio_part(media["audio"])],
        [text_part("And this: "), tone(0.6, 500.0), text_part(" too.")],
        [audio_part(media["audio"]), text_part("Is it the first sound? Look again: "), image_part(media["image"])],
    ]
    history: list[dict] = []
    new_media = [2, 1, 2]
    for k, parts in enumerate(turns):
        req = TurnRequest(parts=parts, history=list(history), system="You are terse.", session_id="s1",
                          principal="alice", max_new_tokens=8, max_audio_frames=30, thinker_sampling=GREEDY)
        before, talker_before, encoded = reused_tokens(), reused_tokens("talker"), audio.items + vision.items
        summary = assert_parity(reference, processor, run(conductor, req), req)
        # Everything up to the last turn's answer is the replica's already: only this turn's media are encoded.
        assert audio.items + vision.items - encoded == new_media[k]
        if k:
            assert reused_tokens() - before >= previous_prompt
            # The Talker's input holds every turn's user parts: the earlier ones' KV is its replica's too.
            assert reused_tokens("talker") - talker_before > 0
        previous_prompt = prompt_length(processor, req)
        history += [{"role": "user", "content": parts}, {"role": "assistant", "content": summary.text}]
    # The session's KV stays parked on the replicas for its next turn; another principal's same id is not its.
    assert engines.thinker.kv.parked_positions > 0 and engines.talker.kv.parked_positions > 0
    other = TurnRequest(parts=turns[0], system="You are terse.", session_id="s1", principal="bob", max_new_tokens=4,
                        audio_output=False, thinker_sampling=GREEDY)
    before = reused_tokens()
    run(conductor, other)
    assert reused_tokens() == before


def test_equal_ids_with_other_media_reuse_only_up_to_that_medium(engines, processor, media):
    """Two audios of one length have the same ids: the digest tells them apart, and the prefix stops before it."""
    thinker = engines.thinker
    loud, quiet = tone(1.0, 440.0), tone(1.0, 440.0)
    quiet["audio"] = quiet["audio"] * 0.5
    first = build_turn(processor, parts=[text_part("Listen: "), loud, text_part(" What is it?")]).processor_outputs
    second = build_turn(processor, parts=[text_part("Listen: "), quiet, text_part(" What is it?")]).processor_outputs
    assert torch.equal(first["input_ids"], second["input_ids"])
    markers = MarkerIds.of(processor.tokenizer)
    segments = [media_segments(po["input_ids"][0], po, markers) for po in (first, second)]
    assert [(s.start, s.end) for s in segments[0]] == [(s.start, s.end) for s in segments[1]]
    assert segments[0][0].digest != segments[1][0].digest

    def prompt(po, segs, key):
        embeds = engines.audio.encode(po["input_features"], po["feature_attention_mask"])
        return ThinkerPrompt(input_ids=po["input_ids"][0], audio_embeds=embeds,
                             audio_feature_lengths=po["feature_attention_mask"].sum(-1), cache_key=key, segments=segs)

    session, _ = thinker.prefill(prompt(first, segments[0], "k"), 2)
    thinker.park(session, prompt(first, segments[0], "k"), [], torch.zeros(0))
    reuse = thinker.claim(prompt(second, segments[1], "k"))
    assert reuse is not None and reuse.tokens == segments[1][0].start
    # The reused prefix and the rest give the logits of a whole prefill.
    session, reused = prefill_with(thinker, prompt(second, segments[1], "k"), reuse)
    whole_session, whole = thinker.prefill(prompt(second, segments[1], ""), 2)
    torch.testing.assert_close(reused.logits, whole.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(reused.mm_hidden, whole.mm_hidden, atol=1e-5, rtol=0)
    session.close()
    whole_session.close()
    assert thinker.kv.free_positions + thinker.kv.parked_positions == thinker.kv.capacity  # every page back


def test_media_bounds_and_expected_reuse_agree_with_the_segments(processor, media):
    """`media_bounds` are `media_segments`' ranges without digests (an audio's windows, an image, a video with its
    sound track); `expected_reuse` is where `reusable_tokens` ends for a replica holding the turn's live prefill (its
    audio's whole windows and a margin so far), known before the digests are."""
    from pathlib import Path

    from PIL import Image

    markers = MarkerIds.of(processor.tokenizer)
    frames = [Image.open(f).convert("RGB") for f in sorted(Path(media["video"]).iterdir())]
    track = tone(1.0, 250.0)["audio"]
    video = video_part({"frames": frames, "timestamps": [0.0, 0.5], "audio": track, "audio_sample_rate": 16000})
    speech = tone(20.0, 300.0)["audio"]
    so_far, whole = ([image_part(media["image"]), video, text_part("Then: "), audio_part(pcm, sample_rate=16000)]
                     for pcm in (speech[:int(16.1 * 16000)], speech))
    held, new = (build_turn(processor, parts=parts).processor_outputs for parts in (so_far, whole + [text_part("?")]))
    segments = {}
    for name, po in (("held", held), ("new", new)):
        segments[name] = media_segments(po["input_ids"][0], po, markers)
        assert media_bounds(po["input_ids"][0], po, markers) == tuple((s.start, s.end) for s in segments[name])
    assert len(segments["new"]) == 2 + 3  # the image, the video, the audio's three windows
    parked = ParkedPrefix(None, held["input_ids"][0], held["input_ids"].shape[1], segments["held"], torch.zeros(0))
    tokens, redone = reusable_tokens(parked, new["input_ids"][0], segments["new"], markers.placeholders)
    assert redone == 0 and tokens == segments["new"][-1].start  # the audio's last window on
    bounds = media_bounds(new["input_ids"][0], new, markers)
    assert expected_reuse(held["input_ids"][0], new["input_ids"][0], bounds) == tokens


def test_the_talker_prefills_a_turns_user_parts_before_its_first_token(engines, processor):
    """The Talker's half of live input: the user parts of the turn so far, prefilled alone (no first token) and kept
    under the turn's key first-out; the answer's prefill takes them back up to where the turn went on, and gives
    the c0s and hidden states of a whole prefill."""
    talker, thinker = engines.talker, engines.thinker
    audio = tone(1.0, 440.0)
    so_far = build_turn(processor, parts=[text_part("Listen: "), audio]).processor_outputs
    whole = build_turn(processor, parts=[text_part("Listen: "), audio, text_part(" What is it?")]).processor_outputs
    # The audio's hidden states are the same in both (causal, and reused by the Thinker in the live path).
    layout = ThinkerPrompt(input_ids=whole["input_ids"][0],
                           audio_embeds=engines.audio.encode(whole["input_features"], whole["feature_attention_mask"]),
                           audio_feature_lengths=whole["feature_attention_mask"].sum(-1))
    thinker_session, prefill = thinker.prefill(layout, 1)
    thinker_session.close()

    def talker_prompt(ids, key, keep, **fields):
        return TalkerPrompt(**{**layout_of(layout), "input_ids": ids, "mm_hidden": prefill.mm_hidden,
                               "cache_key": key, "keep": keep, "rows_tag": "t1", **fields})

    sampling = default_talker_sampling(greedy=True)
    partial = talker_prompt(so_far["input_ids"][0], "alice/turn/1", KEEP_TURN)
    job = talker.start(partial, None, sampling)
    while not job.done:
        assert talker.prefill_step(job) is None  # no first token: no frame
    talker.park(job, partial)
    assert talker.kv.parked_positions >= job.user

    # The audio's rows are not sent again (`mm_from`): their inputs come from what the replica kept for the tag.
    n_mm = len(prefill.mm_hidden)
    full = talker_prompt(whole["input_ids"][0], "alice/turn/1", KEEP_NONE, mm_from=n_mm,
                         mm_hidden=prefill.mm_hidden[n_mm:])
    job = talker.start(full, 9707, sampling, 8)
    # Reused: the user positions up to the audio's end (the turn so far, less its '<|im_end|>\n').
    assert job.session.length == int(talker._user_mask(so_far["input_ids"][0]).sum()) - 2
    session, frame = prefill_whole(job, talker.prefill_step)
    fresh_session, fresh = talker.prefill(dataclasses.replace(full, cache_key="", mm_from=0,
                                                              mm_hidden=prefill.mm_hidden), 9707, sampling, 8)
    for _ in range(4):
        assert frame.c0 == fresh.c0
        torch.testing.assert_close(frame.hidden, fresh.hidden, atol=1e-5, rtol=0)
        embed_sum = engines.mtp.predict(fresh.hidden[None], torch.tensor([fresh.c0])).embed_sum[0]
        frame = talker.step(session, embed_sum, TEXT_END)
        fresh = talker.step(fresh_session, embed_sum, TEXT_END)
    talker.park(job, full)  # KEEP_NONE: freed
    fresh_session.close()
    # Kept for another turn's tag, or not kept at all: PrefixGone (the caller sends every row), the kept KV freed.
    job = talker.start(partial, None, sampling)
    while not job.done:
        talker.prefill_step(job)
    talker.park(job, partial)
    for prompt in (dataclasses.replace(full, rows_tag="t2"), full):
        with pytest.raises(PrefixGone):
            talker.start(prompt, 9707, sampling, 8)
    assert talker.kv.unpark("alice/turn/1") is None
    assert talker.kv.free_positions + talker.kv.parked_positions == talker.kv.capacity  # every page back


def prefill_with(thinker: ThinkerEngine, prompt: ThinkerPrompt, reuse):
    job = thinker.start(prompt, 2, reuse)
    while (result := thinker.prefill_step(job)) is None:
        pass
    return job.session, result


def test_a_full_cache_evicts_parked_prefixes_first_and_the_next_turn_prefills_in_full(tiny_ckpt, engines, processor):
    small = ThinkerEngine.from_checkpoint(Checkpoint.open(tiny_ckpt), kv=KVConfig(kv_tokens=256, page_size=16))
    stages = dataclasses.replace(Stages.local(engines), thinker=LocalThinker(small))
    conductor = Conductor(stages, stage_timeout_s=120)
    req = TurnRequest(parts=[text_part("Tell me about the sea.")], session_id="s", principal="p", max_new_tokens=6,
                      audio_output=False, thinker_sampling=GREEDY)
    first = run(conductor, req)[-1]
    parked = small.kv.parked_positions
    assert parked > 0 and small.kv.free_positions == small.kv.capacity - parked
    # Pages past the answer went back when it was parked: it holds its prompt and answer, rounded up to a page.
    assert parked == -(-(prompt_length(processor, req) + len(first.thinker_token_ids) - 1) // 16) * 16

    # A request that needs every page evicts the parked prefix instead of failing.
    slot = small.kv.reserve(small.kv.capacity)
    assert small.kv.parked_positions == 0
    slot.close()
    history = [{"role": "user", "content": req.parts}, {"role": "assistant", "content": first.text}]
    follow = dataclasses.replace(req, parts=[text_part("And the mountains?")], history=history)
    before = reused_tokens()
    evicted = run(conductor, follow)[-1]
    assert reused_tokens() == before
    fresh = run(conductor, dataclasses.replace(follow, session_id=""))[-1]
    assert evicted.thinker_token_ids == fresh.thinker_token_ids


def test_a_tool_calls_second_generation_prefills_only_the_tool_result(engines):
    """A Thinker that calls a tool generates again on its prompt + its call + the result: with a session key the
    replica holds the first generation's KV, so only the new tokens run."""
    thinker = engines.thinker
    ids = torch.tensor([151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198])
    prompt = ThinkerPrompt(input_ids=ids, cache_key="tool")
    stage = LocalThinker(thinker)

    async def generate(p):
        return [t.token_id async for t in stage.generate(p, GREEDY, 5, frozenset())]

    first = asyncio.run(generate(prompt))
    resumed = ThinkerPrompt(input_ids=torch.cat([ids, torch.tensor(first), torch.tensor([198, 151644, 77091])]),
                            cache_key="tool")
    before = reused_tokens()
    again = asyncio.run(generate(resumed))
    assert reused_tokens() - before == len(ids) + len(first) - 1  # all but the last token, never fed back
    assert again == asyncio.run(generate(dataclasses.replace(resumed, cache_key="")))
    np.testing.assert_equal(thinker.kv.unpark("tool") is not None, True)


def test_a_request_cancelled_while_it_starts_gives_its_pages_back(tiny_ckpt, monkeypatch):
    """Cancelled while `start` runs on the worker thread (its taken-back prefix in hand): the job that start makes
    still gets closed, so neither its pages nor the session's kept ones are lost."""
    import time

    thinker = ThinkerEngine.from_checkpoint(Checkpoint.open(tiny_ckpt), kv=KVConfig(kv_tokens=512, page_size=16))
    stage = LocalThinker(thinker)
    prompt = ThinkerPrompt(input_ids=torch.tensor([151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]),
                           cache_key="s")

    async def generate():
        return [t.token_id async for t in stage.generate(prompt, GREEDY, 4, frozenset())]

    asyncio.run(generate())
    assert thinker.kv.parked_positions > 0
    slow_start = thinker.start

    def start(*args):
        time.sleep(0.3)
        return slow_start(*args)

    monkeypatch.setattr(thinker, "start", start)

    async def cancelled():
        task = asyncio.create_task(generate())
        await asyncio.sleep(0.1)  # the prefix is claimed, start is running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.5)  # start ends on the worker thread

    asyncio.run(cancelled())
    assert thinker.kv.parked_positions == 0 and thinker.kv.free_positions == thinker.kv.capacity
