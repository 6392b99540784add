"""Continuous batching in the Thinker, the Talker and Code2Wav (issue 8): requests that share engine steps get what they get
alone: the same greedy ids and codes, the same seeded samples, the same waveform; chunked prefill equals one
whole prefill; the paged KV cache refuses what cannot fit and gets every page back."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from services.checkpoint.loading import Checkpoint
from services.conductor import Conductor, TurnRequest
from services.config import KVConfig
from services.engines import kv_pages
from services.engines.bundle import Engines
from services.engines.sampling import SamplingParams
from services.engines.thinker import ThinkerEngine, ThinkerPrompt
from services.errors import InvalidInput, ResourceExhausted
from services.events import AudioChunk, TurnSummary
from services.stages import Stages
from services.turn_parts import audio_part, image_part, text_part
from tests.test_thinker import processor_inputs, thinker_prompt

GREEDY = SamplingParams(greedy=True)
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return Engines.load(tiny_ckpt)


def _prompts(processor, engines) -> list[ThinkerPrompt]:
    """Different lengths and modalities: text, audio, image, audio + image, and a multi-turn conversation."""
    prompts = [thinker_prompt(processor_inputs(processor, parts), engines.audio, engines.vision)
               for parts in ([], ["audio"], ["image"], ["audio", "image"])]
    history = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
               {"role": "user", "content": "Tell me about the sea, briefly please."}]
    text = processor.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    prompts.append(ThinkerPrompt(input_ids=processor(text=text, return_tensors="pt")["input_ids"][0]))
    return prompts


def _solo(thinker: ThinkerEngine, prompt: ThinkerPrompt) -> tuple[list[int], torch.Tensor]:
    session, prefill = thinker.prefill(prompt, NEW_TOKENS)
    logits = [prefill.logits]
    for _ in range(NEW_TOKENS - 1):
        logits.append(thinker.decode(session, int(logits[-1].argmax())))
    session.close()
    return [int(x.argmax()) for x in logits], torch.stack(logits)


def test_thinker_decode_batch_equals_each_request_alone(engines, processor):
    """Requests join at different steps, with caches of different lengths and rope deltas, and leave when done."""
    thinker = engines.thinker
    prompts = _prompts(processor, engines)
    solo = [_solo(thinker, p) for p in prompts]
    joins = [0, 0, 2, 3, 5]
    running: dict[int, tuple] = {}  # request -> (session, logits so far)
    finished: dict[int, torch.Tensor] = {}
    for step in range(40):
        for r, join in enumerate(joins):
            if join == step:
                session, prefill = thinker.prefill(prompts[r], NEW_TOKENS)
                running[r] = (session, [prefill.logits])
        rows = [r for r, (_, logits) in running.items() if len(logits) < NEW_TOKENS]
        if rows:
            out = thinker.decode_batch([running[r][0] for r in rows],
                                       [int(running[r][1][-1].argmax()) for r in rows])
            for r, logits in zip(rows, out):
                running[r][1].append(logits)
        for r in [r for r, (_, logits) in running.items() if len(logits) == NEW_TOKENS]:
            session, logits = running.pop(r)
            session.close()
            finished[r] = torch.stack(logits)
        if len(finished) == len(prompts):
            break
    worst = 0.0
    for r, (ids, logits) in enumerate(solo):
        assert [int(x.argmax()) for x in finished[r]] == ids, r
        worst = max(worst, float((finished[r] - logits).abs().max()))
    print(f"max |logit difference| batched vs alone: {worst:.2e}")
    assert worst < 1e-4, worst  # float rounding of a wider matmul only
    assert thinker.kv.free_positions == thinker.kv.capacity


def test_chunked_prefill_equals_one_prefill(tiny_ckpt, engines, processor):
    """A prompt prefilled 5 tokens at a time (deepstack features and mm_hidden split across chunks) equals one
    whole prefill, and decodes the same greedy ids."""
    ckpt = Checkpoint.open(tiny_ckpt)
    chunked = ThinkerEngine.from_checkpoint(ckpt, kv=KVConfig(prefill_chunk=5, page_size=4, kv_tokens=2048))
    prompt = thinker_prompt(processor_inputs(processor, ["audio", "image", "video"]), engines.audio, engines.vision)
    assert len(prompt.input_ids) > 50
    whole_session, whole = engines.thinker.prefill(prompt, 4)
    whole_session.close()
    session, parts = chunked.prefill(prompt, 4)
    session.close()
    torch.testing.assert_close(parts.logits, whole.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(parts.mm_hidden, whole.mm_hidden, atol=1e-5, rtol=0)
    assert _solo(chunked, prompt)[0] == _solo(engines.thinker, prompt)[0]


def test_prompts_prefilled_together_equal_each_alone(tiny_ckpt, engines, processor):
    """Prompts of different lengths and modalities prefill their chunks in shared forwards (padded to the longest;
    a chunk with an image runs alone): each equals its prefill alone, and decodes the same greedy ids."""
    ckpt = Checkpoint.open(tiny_ckpt)
    thinker = ThinkerEngine.from_checkpoint(ckpt, kv=KVConfig(prefill_chunk=16, page_size=4, kv_tokens=4096))
    prompts = _prompts(processor, engines)
    padded = []
    prefill_padded = thinker._prefill_padded
    thinker._prefill_padded = lambda jobs: padded.append(len(jobs)) or prefill_padded(jobs)
    jobs = [thinker.start(p, NEW_TOKENS) for p in prompts]
    results: dict[int, object] = {}
    while len(results) < len(jobs):
        waiting = [i for i in range(len(jobs)) if i not in results]
        for i, result in zip(waiting, thinker.prefill_batch([jobs[i] for i in waiting])):
            if result is not None:
                results[i] = result
    assert padded and max(padded) >= 3  # really shared
    worst = 0.0
    for i, prompt in enumerate(prompts):
        session, alone = thinker.prefill(prompt, NEW_TOKENS)
        session.close()
        assert int(results[i].logits.argmax()) == int(alone.logits.argmax())
        worst = max(worst, float((results[i].logits - alone.logits).abs().max()))
        torch.testing.assert_close(results[i].mm_hidden, alone.mm_hidden, atol=1e-4, rtol=0)
        ids, logits = [int(results[i].logits.argmax())], []
        for _ in range(NEW_TOKENS - 1):
            logits.append(thinker.decode(jobs[i].session, ids[-1]))
            ids.append(int(logits[-1].argmax()))
        jobs[i].session.close()
        assert ids == _solo(thinker, prompt)[0], i
    print(f"max |logit difference| prefilled together vs alone: {worst:.2e}")
    assert worst < 1e-4, worst
    assert thinker.kv.free_positions == thinker.kv.capacity


def test_a_closed_prompt_in_a_shared_prefill_fails_alone(engines, processor):
    """A request cancelled while its chunk waits gets its own error; the prompts beside it prefill as usual."""
    thinker = engines.thinker
    prompts = [p for p in _prompts(processor, engines) if p.image is None]
    jobs = [thinker.start(p, NEW_TOKENS) for p in prompts]
    jobs[1].session.close()
    results = thinker.prefill_batch(jobs)
    assert isinstance(results[1], InvalidInput) and "closed" in str(results[1])
    for i in (0, 2):
        session, alone = thinker.prefill(prompts[i], NEW_TOKENS)
        session.close()
        assert int(results[i].logits.argmax()) == int(alone.logits.argmax())
        jobs[i].session.close()
    assert thinker.kv.free_positions == thinker.kv.capacity


def test_turns_that_arrive_together_share_their_prefill(tiny_ckpt, engines, processor):
    """Through the stage: prompts submitted at once prefill in one forward (the step waits for those still
    starting), and each request's tokens equal its run alone."""
    from services.stages import LocalThinker

    thinker = ThinkerEngine.from_checkpoint(Checkpoint.open(tiny_ckpt), kv=KVConfig(prefill_chunk=2048))
    stage = LocalThinker(thinker)
    prompts = [p for p in _prompts(processor, engines) if p.image is None]  # text, audio, multi-turn
    before = _batch_sizes("thinker_prefill")

    async def generate(prompt):
        return [t.token_id async for t in stage.generate(prompt, GREEDY, NEW_TOKENS, frozenset())]

    async def together():
        return await asyncio.gather(*(generate(p) for p in prompts))

    got = asyncio.run(together())
    rows, steps = _since("thinker_prefill", before)
    assert (rows, steps) == (len(prompts), 1)  # one chunk each, all in one step
    assert got == [_solo(engines.thinker, p)[0] for p in prompts]
    assert thinker.kv.free_positions == thinker.kv.capacity


def test_talker_prompts_prefilled_together_equal_each_alone(tiny_ckpt, engines, processor):
    """The Talker's prompts (user parts, assistant prefix) prefill in shared forwards too: the same first c0 and
    hidden as alone, then the same steps; a prompt of user parts only gives no frame."""
    from services.engines.positions import layout_of
    from services.engines.talker import TalkerEngine, TalkerPrompt

    talker = TalkerEngine.from_checkpoint(Checkpoint.open(tiny_ckpt),
                                          kv=KVConfig(prefill_chunk=16, page_size=4, kv_tokens=4096))
    width = engines.thinker.hidden_size
    prompts = []
    for i, p in enumerate(_prompts(processor, engines)):
        n_mm = int(torch.isin(p.input_ids, talker.mm_token_ids).sum())
        prompts.append(TalkerPrompt(**layout_of(p), mm_hidden=torch.randn(n_mm, width,
                                                                          generator=torch.Generator().manual_seed(i))))
    first_tokens = [9707 + i for i in range(len(prompts))]
    padded = []
    prefill_padded = talker._prefill_padded
    talker._prefill_padded = lambda jobs: padded.append(len(jobs)) or prefill_padded(jobs)
    jobs = [talker.start(p, t, GREEDY, 8) for p, t in zip(prompts, first_tokens)]
    jobs.append(talker.start(prompts[0], None, GREEDY))  # user parts only
    frames: dict[int, object] = {}
    while any(not job.done for job in jobs):
        waiting = [i for i, job in enumerate(jobs) if not job.done]
        for i, frame in zip(waiting, talker.prefill_batch([jobs[i] for i in waiting])):
            frames[i] = frame
    assert padded and max(padded) >= 3 and frames[len(prompts)] is None
    codec_embed_sum = torch.zeros(talker.model.config.hidden_size)
    for i, (prompt, token) in enumerate(zip(prompts, first_tokens)):
        session, alone = talker.prefill(prompt, token, GREEDY, 8)
        assert frames[i].c0 == alone.c0, i
        torch.testing.assert_close(frames[i].hidden, alone.hidden, atol=1e-4, rtol=0)
        ours, theirs = (talker.step(s, codec_embed_sum, 9707) for s in (jobs[i].session, session))
        assert ours.c0 == theirs.c0, i
        torch.testing.assert_close(ours.hidden, theirs.hidden, atol=1e-4, rtol=0)
        session.close()
        jobs[i].session.close()
    jobs[-1].session.close()
    assert talker.kv.free_positions == talker.kv.capacity


def test_a_step_of_prompt_chunks_fits_one_chunk():
    """Items padded to the widest: a step takes them while their count times the widest fits the budget."""
    from services.batching import StepBatcher

    steps: list[list[int]] = []
    batcher = StepBatcher("budget", lambda items: steps.append(list(items)) or list(items), max_tokens=16,
                          tokens=lambda n: n)

    async def run():
        return await asyncio.gather(*(batcher.submit(n) for n in (4, 4, 4, 4, 9, 20, 1)))

    assert asyncio.run(run()) == [4, 4, 4, 4, 9, 20, 1]
    assert steps == [[4, 4, 4, 4], [9], [20], [1]]  # 5 x 9 > 16; 2 x 20 > 16; a wide one alone still runs


def test_a_decode_step_reads_its_keys_in_place_and_scattered_pages_give_the_same_bits(tiny_ckpt, engines, processor,
                                                                                       monkeypatch):
    """A request whose pages are one run (a fresh pool's) attends to its keys where they lie: no copy of its history
    per layer per step (1.4x per decode step at 8k positions and the real widths). Pages that other requests left
    scattered are gathered instead, with the same bits."""
    in_place: list[bool] = []  # per decode step's layer: the keys given to attention are the pool's own memory
    update = kv_pages._StepCache.update

    def spy(self, key, value, layer_idx, *args, **kwargs):
        out = update(self, key, value, layer_idx, *args, **kwargs)
        if key.shape[2] == 1:
            in_place.append(out[0].untyped_storage().data_ptr() == self.pool.keys.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(kv_pages._StepCache, "update", spy)
    # Eager steps, which the spy sees each of (a replayed step runs the spy once, as it is traced); the replayed
    # steps give the eager steps' bits (test_replay).
    thinker = ThinkerEngine.from_checkpoint(Checkpoint.open(tiny_ckpt), kv=KVConfig(kv_tokens=1024, page_size=4),
                                            replay=False)
    prompt = _prompts(processor, engines)[-1]
    ids, logits = _solo(thinker, prompt)
    assert in_place and all(in_place)
    others = [thinker.kv.reserve(4) for _ in range(8)]
    for slot in others[::2]:
        slot.close()  # four one-page holes: the next request's first pages
    in_place.clear()
    scattered_ids, scattered_logits = _solo(thinker, prompt)
    assert in_place and not any(in_place)
    assert scattered_ids == ids and torch.equal(scattered_logits, logits)


def test_the_kv_cache_refuses_what_cannot_fit_and_frees_every_page(tiny_ckpt):
    thinker = ThinkerEngine.from_checkpoint(Checkpoint.open(tiny_ckpt), kv=KVConfig(kv_tokens=64, page_size=16))
    prompt = ThinkerPrompt(input_ids=torch.tensor([151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]))
    with pytest.raises(ResourceExhausted, match="exceeds this replica's KV cache of 64 positions"):
        thinker.prefill(prompt, 100)
    first, _ = thinker.prefill(prompt, 20)  # 29 positions: 2 pages
    second, _ = thinker.prefill(prompt, 20)
    with pytest.raises(ResourceExhausted, match="the KV cache is full"):
        thinker.prefill(prompt, 20)
    first.close()
    first.close()  # twice is harmless: the pages go back once
    third, _ = thinker.prefill(prompt, 20)
    second.close(), third.close()
    assert thinker.kv.free_positions == 64


def _batch_sizes(stage: str) -> tuple[float, float]:
    """(items, steps) of the stage's engine steps so far, in this process."""
    labels = {"stage": stage}
    return (REGISTRY.get_sample_value("omni_stage_batch_rows_total", labels) or 0.0,
            REGISTRY.get_sample_value("omni_stage_step_seconds_count", labels) or 0.0)


def _since(stage: str, before: tuple[float, float]) -> tuple[float, float]:
    """(items, steps) of the stage's engine steps since `before` (a `_batch_sizes`)."""
    return tuple(after - b for after, b in zip(_batch_sizes(stage), before))


async def _turn(conductor: Conductor, req: TurnRequest, delay_s: float = 0.0, stop_after_audio: bool = False):
    await asyncio.sleep(delay_s)
    samples, summary = [], None
    async with aclosing(conductor.run(req)) as events:
        async for event in events:
            if isinstance(event, AudioChunk):
                samples.append(event.samples)
                if stop_after_audio:
                    return None  # the client goes away mid-turn
            elif isinstance(event, TurnSummary):
                summary = event
    return summary, np.concatenate(samples) if samples else np.zeros(0, np.float32)


def test_concurrent_turns_share_steps_and_equal_their_solo_runs(engines, media):
    """Five turns at once (text, audio, image, multi-turn, one sampled with seeds) joining at different times,
    plus one abandoned after its first audio: each equals its run alone, and the steps were shared."""
    seeded = SamplingParams(greedy=False, temperature=0.8, top_k=20, seed=11)
    requests = [
        TurnRequest(parts=[text_part("Hello world, this is Qwen.")], max_new_tokens=16, max_audio_frames=48,
                    thinker_sampling=GREEDY),
        TurnRequest(parts=[audio_part(media["audio"]), text_part("What do you hear?")], max_new_tokens=10,
                    max_audio_frames=30, thinker_sampling=GREEDY),
        TurnRequest(parts=[image_part(media["image"]), text_part("Describe it.")], speaker="aiden",
                    max_new_tokens=12, max_audio_frames=36, thinker_sampling=GREEDY),
        TurnRequest(parts=[text_part("And now?")], max_new_tokens=12, max_audio_frames=40, thinker_sampling=GREEDY,
                    history=[{"role": "user", "content": "Count with me."}, {"role": "assistant", "content": "One."}]),
        TurnRequest(parts=[text_part("Surprise me.")], max_new_tokens=14, max_audio_frames=40,
                    thinker_sampling=seeded, talker_sampling=SamplingParams(greedy=False, temperature=0.9,
                                                                            top_k=50, repetition_penalty=1.05,
                                                                            seed=5)),
    ]
    conductor = Conductor(Stages.local(engines), stage_timeout_s=120)

    async def alone():
        return [await _turn(conductor, r) for r in requests]

    async def together():
        abandoned = TurnRequest(parts=[text_part("Never mind.")], max_new_tokens=30, max_audio_frames=90,
                                thinker_sampling=GREEDY)
        return await asyncio.gather(*(_turn(conductor, r, delay_s=0.02 * i) for i, r in enumerate(requests)),
                                    _turn(conductor, abandoned, delay_s=0.01, stop_after_audio=True))

    solo = asyncio.run(alone())
    before = {stage: _batch_sizes(stage) for stage in ("thinker", "talker", "code2wav")}
    shared = asyncio.run(together())
    assert shared[-1] is None
    for (want, want_samples), (got, got_samples) in zip(solo, shared[:-1]):
        assert got.thinker_token_ids == want.thinker_token_ids and got.text == want.text
        assert got.codes == want.codes and len(want.codes) > 0
        assert got_samples.shape == want_samples.shape
        np.testing.assert_allclose(got_samples, want_samples, atol=1e-4)
    for stage, counts in before.items():
        rows, steps = _since(stage, counts)
        print(f"{stage}: {rows / steps:.2f} requests per step")
        assert rows / steps > 1.2, stage  # rows per step: really batched
    for engine in (engines.thinker, engines.talker):  # the abandoned turn's pages came back too
        assert engine.kv.free_positions == engine.kv.capacity


def test_turns_that_start_together_step_together_from_their_prefill(engines):
    """Turns that start at once prefill in one Thinker step and one Talker step (each waits for the prompts
    still starting beside it); each equals its run alone."""
    requests = [TurnRequest(parts=[text_part(text)], max_new_tokens=8, max_audio_frames=12, thinker_sampling=GREEDY)
                for text in ("Hello there.", "What is the time in Paris, please?", "Sing.", "Count to three.")]
    conductor = Conductor(Stages.local(engines), stage_timeout_s=120)

    async def alone():
        return [await _turn(conductor, r) for r in requests]

    async def together():
        return await asyncio.gather(*(_turn(conductor, r) for r in requests))

    solo = asyncio.run(alone())
    stages = ("thinker_prefill", "talker_prefill")
    before = {stage: _batch_sizes(stage) for stage in stages}
    shared = asyncio.run(together())
    for (want, want_samples), (got, got_samples) in zip(solo, shared):
        assert got.thinker_token_ids == want.thinker_token_ids and got.codes == want.codes
        np.testing.assert_allclose(got_samples, want_samples, atol=1e-4)
    for stage in stages:
        rows, steps = _since(stage, before[stage])
        assert (rows, steps) == (len(requests), 1), stage


def test_a_long_prefill_holds_the_running_requests_up_one_chunk_at_a_time(tiny_ckpt, engines, processor):
    """A new request's prompt prefills in chunks of `prefill_chunk` tokens, and the decode steps of the request
    already running go on between its chunks (the stage's worker thread takes them in turn)."""
    from services.stages import LocalThinker

    thinker = ThinkerEngine.from_checkpoint(Checkpoint.open(tiny_ckpt), kv=KVConfig(prefill_chunk=8))
    calls: list[str] = []
    prefill_step, decode_batch = thinker.prefill_step, thinker.decode_batch

    def logged_prefill(job):
        calls.append(f"chunk{len(job.embeds)}")
        return prefill_step(job)

    def logged_decode(sessions, token_ids):
        calls.append("step")
        return decode_batch(sessions, token_ids)

    thinker.prefill_step, thinker.decode_batch = logged_prefill, logged_decode
    stage = LocalThinker(thinker)
    short = ThinkerPrompt(input_ids=torch.tensor([151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]))
    long = _prompts(processor, engines)[3]  # audio + image: many chunks of 8
    chunks = -(-len(long.input_ids) // 8)
    assert chunks >= 6

    async def run():
        async def generate(prompt, n):
            return [t.token_id async for t in stage.generate(prompt, GREEDY, n, frozenset())]

        running = asyncio.create_task(generate(short, 200))
        while calls.count("step") < 3:
            await asyncio.sleep(0.001)
        second = await generate(long, 2)
        return await running, second

    first_ids, second_ids = asyncio.run(run())
    assert len(first_ids) == 200 and second_ids == _solo(engines.thinker, long)[0][:2]
    mine = [i for i, c in enumerate(calls) if c == f"chunk{len(long.input_ids)}"]
    assert len(mine) == chunks
    # Between two chunks of the long prompt, the running request took a step: it waited one chunk, not the prompt
    # (`StepBatcher.make_way`: without it a short chunk that ends before the request queues its next step lets the
    # next chunk go first, as one CI run saw).
    assert all("step" in calls[a + 1:b] for a, b in zip(mine, mine[1:])), calls


def test_a_step_waits_only_for_requests_in_progress():
    """A step waits (up to max_wait_s) for the items of the requests in progress (`member`), and not at all when
    they are all there: a lone request never pays the wait."""
    from services.batching import StepBatcher

    steps: list[list[str]] = []

    def run(items):
        steps.append(list(items))
        return items

    batcher = StepBatcher("test", run, max_batch=8, max_wait_s=0.5)

    async def request(item, delay_s=0.0):
        with batcher.member():
            await asyncio.sleep(delay_s)
            return await batcher.submit(item)

    async def scenario():
        t0 = asyncio.get_running_loop().time()
        assert await asyncio.gather(request("a"), request("b", 0.05)) == ["a", "b"]
        waited = asyncio.get_running_loop().time() - t0
        t1 = asyncio.get_running_loop().time()
        assert await request("c") == "c"
        return waited, asyncio.get_running_loop().time() - t1

    waited, alone = asyncio.run(scenario())
    assert steps == [["a", "b"], ["c"]]  # b joined a's step: the step waited for it
    assert 0.04 < waited < 0.45 and alone < 0.25  # neither step waited the whole max_wait_s


def test_a_long_job_makes_way_for_the_step_of_the_requests_in_progress():
    """`make_way` between a caller's jobs on the stage's worker (a long prompt's chunks) lets the requests in
    progress step first, even one that queues its next item many event-loop turns after its last result; without
    it, short jobs run back to back ahead of that request."""
    from services.batching import StepBatcher
    from services.workers import on_worker

    def scenario(make_way: bool) -> list[str]:
        order: list[str] = []
        batcher = StepBatcher("test-make-way", lambda items: [order.append("step") for _ in items], max_batch=4)

        async def decoding(done: asyncio.Event):
            with batcher.member():
                while not done.is_set():
                    await batcher.submit("token")
                    for _ in range(2000):  # a request's own work before its next step (sampling, its consumer)
                        await asyncio.sleep(0)

        async def prompt(done: asyncio.Event):
            while order.count("step") < 2:
                await asyncio.sleep(0.001)
            handed = batcher.handed()
            for chunk in range(6):
                if chunk and make_way:
                    await batcher.make_way(handed, timeout_s=2.0)
                handed = batcher.handed()
                await on_worker("test-make-way", order.append, "chunk")
            done.set()

        async def run():
            done = asyncio.Event()
            await asyncio.gather(decoding(done), prompt(done))

        asyncio.run(run())
        return order

    def back_to_back(order: list[str]) -> int:
        chunks = [i for i, what in enumerate(order) if what == "chunk"]
        return sum("step" not in order[a + 1:b] for a, b in zip(chunks, chunks[1:]))

    assert back_to_back(scenario(make_way=False)) > 0  # the scenario shows the race
    assert back_to_back(scenario(make_way=True)) == 0


def test_in_process_stage_workers_compute_with_their_share_of_the_cores(engines):
    """In one process the stages' worker threads compute at once: at torch's default each would run a thread per
    core and their OpenMP threads would spin against each other. Each takes its share; the caller keeps its own."""
    from services.workers import CONCURRENT_ENGINES, on_worker

    async def worker_threads() -> list[int]:
        return list(await asyncio.gather(*(on_worker(stage, torch.get_num_threads)
                                           for stage in ("thinker", "talker", "mtp", "code2wav"))))

    own = torch.get_num_threads()
    torch.set_num_threads(2 * CONCURRENT_ENGINES)  # a machine of 8 cores: 2 each
    try:
        Stages.local(engines)
        assert asyncio.run(worker_threads()) == [2] * 4
        assert torch.get_num_threads() == 2 * CONCURRENT_ENGINES
    finally:
        torch.set_num_threads(own)
        Stages.local(engines)  # the share of this machine's cores, for the tests after this one
    assert asyncio.run(worker_threads()) == [max(1, own // CONCURRENT_ENGINES)] * 4


def test_streams_that_start_together_share_their_first_code2wav_frame(engines, monkeypatch):
    """Turns that start together hand Code2Wav their first frames together: one forward for all of them (never
    with a steady stream's frame, whose transposed convs no longer trim), and each gets the samples it gets alone."""
    from services.engines import code2wav
    from services.stages import LocalCode2Wav

    forwards = []  # streams per Code2Wav forward
    push = code2wav._push
    monkeypatch.setattr(code2wav, "_push", lambda streams, codes: forwards.append(len(streams)) or push(streams, codes))

    g = torch.Generator().manual_seed(3)
    codes = [torch.randint(0, engines.code2wav.codebook_size, (2, engines.code2wav.num_quantizers), generator=g)
             for _ in range(3)]
    alone = [engines.code2wav.decode(c) for c in codes]
    stage = LocalCode2Wav(engines.code2wav)

    async def stream(c):
        async def frames():
            for frame in c.tolist():
                yield tuple(frame)
        return torch.cat([s async for s in stage.decode(frames())])

    async def together():
        return await asyncio.gather(*(stream(c) for c in codes))

    before = _batch_sizes("code2wav")
    got = asyncio.run(together())
    assert _since("code2wav", before) == (6, 2)  # 3 first frames, then 3 second frames
    assert forwards == [3, 3]
    for want, samples in zip(alone, got):
        torch.testing.assert_close(samples, want, rtol=0, atol=1e-4)
