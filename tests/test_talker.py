"""Talker + MTP engines against the reference: driven frame by frame (greedy), they give generate()'s talker_codes."""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import GenerationConfig

from services.checkpoint.loading import Checkpoint
from services.engines.mtp import MTPEngine
from services.engines.sampling import Sampler, SamplingParams, greedy_ids, process_rows, sample_rows
from services.engines.talker import TEXT_END, TalkerEngine, TalkerPrompt, default_talker_sampling
from services.errors import CheckpointError, InvalidInput, ResourceExhausted

pytestmark = pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`:UserWarning")  # the reference's

THINKER_TOKENS = 12  # text ends (then tts_eos, tts_pad) well before the Talker's cap
TALKER_TOKENS = 40  # c0 cap: 39 frames

_rng = np.random.default_rng(0)
AUDIO = (0.1 * _rng.standard_normal(16000)).astype(np.float32)  # 1 s: 13 audio tokens
IMAGE = Image.fromarray(_rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))  # grid 1x4x4: 4 image tokens


def _user(*parts, text="What do you hear and see?"):
    return {"role": "user", "content": [{"type": p} for p in parts] + [{"type": "text", "text": text}]}


SYSTEM = {"role": "system", "content": "You are Qwen."}
CASES = {  # name: (speaker, messages, audios, images)
    "text": ("ethan", [SYSTEM, _user()], [], []),
    "audio": ("Chelsie", [SYSTEM, _user("audio")], [AUDIO], []),
    "image": ("aiden", [SYSTEM, _user("image")], [], [IMAGE]),
    "audio_image": ("ethan", [SYSTEM, _user("audio", "image")], [AUDIO], [IMAGE]),
    "two_turns": ("chelsie", [SYSTEM, _user("audio"), {"role": "assistant", "content": "A noise."},
                              _user("image", text="And now?")], [AUDIO], [IMAGE]),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation (and spin on a shared 2-core box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return Checkpoint.open(tiny_ckpt)


@pytest.fixture(scope="module")
def talker(ckpt):
    return TalkerEngine.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def mtp(ckpt):
    return MTPEngine.from_checkpoint(ckpt)


@contextmanager
def _capture(reference):
    """Record the Thinker's generate() result and the codes handed to Code2Wav (whose decode is skipped)."""
    seen = {}
    thinker_generate = reference.thinker.generate

    def thinker(*args, **kwargs):
        seen["thinker"] = thinker_generate(*args, **kwargs)
        return seen["thinker"]

    def decode(codes, **kwargs):
        seen["codes"] = codes[0].T  # [frames, 16]
        return torch.zeros(1, 1, 1)

    reference.thinker.generate, reference.code2wav.chunked_decode = thinker, decode
    try:
        yield seen
    finally:
        del reference.thinker.generate, reference.code2wav.chunked_decode


def _inputs(processor, messages, audios, images):
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=text, audio=audios or None, images=images or None, return_tensors="pt")


def _reference(reference, inputs, speaker, **kwargs):
    with _capture(reference) as seen:
        reference.generate(**inputs, speaker=speaker, thinker_max_new_tokens=THINKER_TOKENS, thinker_do_sample=False,
                           talker_do_sample=False, **{"talker_max_new_tokens": TALKER_TOKENS, **kwargs})
    return seen["thinker"], seen["codes"]


def _drive(talker, mtp, reference, inputs, thinker, speaker, stop_id=None, max_tokens=TALKER_TOKENS):
    """The conductor's loop: one released text token per frame, TEXT_END after the text, until EOS or the cap."""
    config = reference.config
    ids = inputs["input_ids"][0]
    generated = thinker.sequences[0, len(ids):]
    mm = torch.isin(ids, torch.tensor([config.thinker_config.audio_token_id, config.thinker_config.image_token_id,
                                       config.thinker_config.video_token_id]))
    accept = thinker.hidden_states[0][config.talker_config.accept_hidden_layer][0]  # [L, D] prefill hidden
    mask = inputs.get("feature_attention_mask")
    prompt = TalkerPrompt(
        input_ids=ids, mm_hidden=accept[mm] if mm.any() else None, speaker=speaker,
        audio_feature_lengths=None if mask is None else mask.sum(1), image_grid_thw=inputs.get("image_grid_thw"),
    )
    # The reference speaks t1 .. t_{n-2} (talker.py, "Frames"): the text before EOS, or all but the capped token.
    text = generated[1:-1].tolist()
    stop_id = talker.codec_eos_id if stop_id is None else stop_id
    session, frame = talker.prefill(prompt, int(generated[0]), default_talker_sampling(greedy=True), max_tokens)
    codes = []
    for k in range(1, max_tokens):
        if frame.c0 == stop_id:
            break
        res = mtp.predict(frame.hidden[None], torch.tensor([frame.c0]))
        codes.append(res.codes[0])
        frame = talker.step(session, res.embed_sum[0], text[k - 1] if k <= len(text) else TEXT_END)
    session.close()
    return torch.stack(codes), text


@pytest.mark.parametrize("case", CASES)
def test_codes_match_reference(case, reference, processor, talker, mtp, ckpt):
    speaker, messages, audios, images = CASES[case]
    inputs = _inputs(processor, messages, audios, images)
    thinker, expected = _reference(reference, inputs, speaker)
    ours, text = _drive(talker, mtp, reference, inputs, thinker, speaker)
    assert expected.shape == (TALKER_TOKENS - 1, 16)  # the capped c0 gets no residual codes
    assert len(text) + 2 < len(expected)  # speech went on past tts_eos into tts_pad
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # Our Talker needs no reference patch: its config still lacks audio_config (read from the Thinker's instead).
    assert not hasattr(ckpt.config.talker_config, "audio_config")


def test_eos_ended_thinker_and_talker(reference, processor, talker, mtp):
    """Thinker stops at its EOS, Talker at codec EOS: the EOS c0 gets no frame. Stand-in EOS ids are tokens the
    random model does produce (greedy prefixes do not depend on the EOS id)."""
    speaker, messages, audios, images = CASES["audio"]
    inputs = _inputs(processor, messages, audios, images)
    thinker, _ = _reference(reference, inputs, speaker)
    generated = thinker.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    thinker_eos = next(t for i, t in enumerate(generated) if i >= 6 and t not in generated[:i])
    thinker, codes = _reference(reference, inputs, speaker, thinker_eos_token_id=thinker_eos)
    assert thinker.sequences[0, -1] == thinker_eos and thinker.sequences.shape[1] < inputs["input_ids"].shape[1] + 12
    c0 = codes[:, 0].tolist()
    talker_eos = next(t for i, t in enumerate(c0) if i >= 15 and t not in c0[:i])
    thinker, expected = _reference(reference, inputs, speaker, thinker_eos_token_id=thinker_eos,
                                   talker_eos_token_id=talker_eos, talker_max_new_tokens=80)
    assert len(expected) == c0.index(talker_eos)
    ours, _ = _drive(talker, mtp, reference, inputs, thinker, speaker, stop_id=talker_eos, max_tokens=80)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


def test_mtp_batch_equals_one_by_one(mtp, talker):
    hidden = torch.randn(3, talker.codec_head.in_features, generator=torch.Generator().manual_seed(0))
    c0 = torch.tensor([5, 2047, 2150])
    batch = mtp.predict(hidden, c0)
    for i in range(3):
        one = mtp.predict(hidden[i:i + 1], c0[i:i + 1])
        torch.testing.assert_close(batch.codes[i:i + 1], one.codes, rtol=0, atol=0)
        torch.testing.assert_close(batch.embed_sum[i:i + 1], one.embed_sum, rtol=1e-5, atol=1e-5)
    assert batch.codes.shape == (3, 16) and (batch.codes[:, 0] == c0).all()
    sampled = [mtp.predict(hidden, c0, greedy=False, generator=torch.Generator().manual_seed(7)).codes for _ in "ab"]
    torch.testing.assert_close(sampled[0], sampled[1], rtol=0, atol=0)  # the generator alone decides the draw
    assert (sampled[0][:, 1:] < mtp.predictor.config.vocab_size).all()


@pytest.mark.parametrize("rows", [1, 3, 6, 11])
def test_mtp_codes_equal_the_code_predictors_generate(mtp, talker, rows):
    """The engine's steps (the reference layers' arithmetic without their wrappers) against the code predictor's
    own `generate`, greedy, called as the reference Talker calls it: the same codes for every row, whatever the
    batch (padded to its size bucket) and the scale of the hidden states; the embedding sum is the one the
    reference Talker builds from those codes."""
    gen = torch.Generator().manual_seed(rows)
    for scale in (0.1, 1.0, 30.0):
        hidden = scale * torch.randn(rows, talker.codec_head.in_features, generator=gen)
        c0 = torch.randint(0, mtp.vocab_size, (rows,), generator=gen)
        with torch.inference_mode():
            c0_embed = mtp.c0_embedding(c0)
            expected = mtp.predictor.generate(inputs_embeds=torch.stack((hidden, c0_embed), dim=1),
                                              max_new_tokens=mtp.num_code_groups - 1, do_sample=False)
            ours = mtp.predict(hidden, c0)
            tables = mtp.predictor.get_input_embeddings()
            embeds = [c0_embed] + [tables[i](ours.codes[:, i + 1]) for i in range(mtp.num_code_groups - 1)]
        torch.testing.assert_close(ours.codes[:, 1:], expected, rtol=0, atol=0)
        torch.testing.assert_close(ours.embed_sum, torch.stack(embeds, dim=1).sum(dim=1), rtol=0, atol=0)


def test_mtp_refuses_a_code_predictor_it_does_not_mirror(mtp):
    predictor = copy.deepcopy(mtp.predictor)
    predictor.config._attn_implementation = "eager"
    with pytest.raises(CheckpointError, match="sdpa attention"):
        MTPEngine(predictor, mtp.c0_embedding, mtp.device)


def test_mtp_rows_sample_on_their_own(mtp, talker):
    """In one batch, greedy and sampled rows each get what they would get alone, a sampled row from its own
    generator: what a request is batched with never changes its codes."""
    hidden = torch.randn(4, talker.codec_head.in_features, generator=torch.Generator().manual_seed(1))
    c0 = torch.tensor([5, 9, 100, 2047])
    greedy = [True, False, True, False]
    seeds = [None, 11, None, 12]

    def gens():
        return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]

    batch = mtp.predict(hidden, c0, greedy, gens())
    for i, (g, gen) in enumerate(zip(greedy, gens())):
        one = mtp.predict(hidden[i:i + 1], c0[i:i + 1], g, gen)
        torch.testing.assert_close(batch.codes[i:i + 1], one.codes, rtol=0, atol=0)
    # Reordered, beside 5 more rows, and padded to a size bucket (9 rows -> 16): the same rows, the same codes.
    order = [3, 1, 0, 2]
    again = mtp.predict(torch.cat([hidden[order], hidden[:1].expand(5, -1)]), torch.cat([c0[order], c0[:1].expand(5)]),
                        [greedy[i] for i in order] + [True] * 5, [gens()[i] for i in order] + [None] * 5)
    torch.testing.assert_close(again.codes[:4], batch.codes[order], rtol=0, atol=0)
    with pytest.raises(InvalidInput, match="one greedy flag and generator per row"):
        mtp.predict(hidden, c0, [True])


def test_local_mtp_serves_one_event_loop_after_another(mtp, talker):
    """`omni generate`, tests and a gateway thread each run their own loop over the same stages: the MTP batcher
    must not stay bound to the first one (its waits would never wake)."""
    import asyncio

    from services.stages import LocalMTP

    local = LocalMTP(mtp)
    hidden = torch.randn(1, talker.codec_head.in_features, generator=torch.Generator().manual_seed(2))
    c0 = torch.tensor([7])
    want = mtp.predict(hidden, c0).codes
    for _ in range(2):
        got = asyncio.run(asyncio.wait_for(local.predict(hidden, c0, True, None), 30))
        torch.testing.assert_close(got.codes, want, rtol=0, atol=0)


def test_invalid_input(talker, mtp):
    ids = torch.tensor([151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198])  # user: "Hello", then assistant
    greedy = default_talker_sampling(greedy=True)
    with pytest.raises(InvalidInput, match="aiden, chelsie, ethan"):
        talker.prefill(TalkerPrompt(input_ids=ids, mm_hidden=None, speaker="nobody"), 9707, greedy)
    with pytest.raises(InvalidInput, match="assistant"):
        talker.prefill(TalkerPrompt(input_ids=ids[:-3], mm_hidden=None), 9707, greedy)
    with_audio = torch.cat((ids[:3], torch.tensor([151669, 151675, 151675, 151670]), ids[3:]))
    with pytest.raises(InvalidInput, match="2 multimodal placeholders"):
        talker.prefill(TalkerPrompt(input_ids=with_audio, mm_hidden=torch.zeros(3, 64)), 9707, greedy)

    session, frame = talker.prefill(TalkerPrompt(input_ids=ids, mm_hidden=None), 9707, greedy, max_new_tokens=3)
    embed_sum = mtp.predict(frame.hidden[None], torch.tensor([frame.c0])).embed_sum[0]
    talker.step(session, embed_sum, TEXT_END)
    with pytest.raises(InvalidInput, match="after TEXT_END"):
        talker.step(session, embed_sum, 9707)
    talker.step(session, embed_sum, TEXT_END)
    with pytest.raises(ResourceExhausted, match="full"):
        talker.step(session, embed_sum, TEXT_END)
    session.close()
    with pytest.raises(InvalidInput, match="closed"):
        talker.step(session, embed_sum, TEXT_END)


def test_engines_read_only_their_tensors(tiny_ckpt):
    ckpt = Checkpoint.open(tiny_ckpt)
    talker = TalkerEngine.from_checkpoint(ckpt)
    own = [n for n in ckpt.names("talker.") if not n.startswith("talker.code_predictor.")]
    assert sorted(ckpt.read_log) == sorted(own + ["thinker.model.embed_tokens.weight"])
    ckpt = Checkpoint.open(tiny_ckpt)
    mtp = MTPEngine.from_checkpoint(ckpt)
    own = ckpt.names("talker.code_predictor.") + ["talker.model.codec_embedding.weight"]
    assert sorted(ckpt.read_log) == sorted(own)
    assert talker.parameter_bytes > 0 and mtp.parameter_bytes > 0


@pytest.mark.parametrize("greedy", [False, True])
def test_sampler_matches_generate_processors(reference, talker, greedy):
    """Same scores and, with the same seed, the same draws as generate()'s own processors for the Talker."""
    params = default_talker_sampling(greedy=greedy, seed=3)
    generation_config = GenerationConfig(
        do_sample=not greedy, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        repetition_penalty=params.repetition_penalty, suppress_tokens=talker.suppress_tokens,
    )
    processors = reference.talker._get_logits_processor(
        generation_config, input_ids_seq_length=0, model_kwargs={"attention_mask": torch.ones(1, 5)}
    )
    sampler = Sampler(params, talker.suppress_tokens)
    generator = torch.Generator().manual_seed(3)
    logits_rng = torch.Generator().manual_seed(0)
    history = torch.zeros(1, 0, dtype=torch.long)
    for _ in range(30):
        # Peaked logits over few ids so that repeats (and so the penalty) happen.
        logits = torch.randn(3072, generator=logits_rng) + 8 * (torch.arange(3072) % 97 == 0)
        scores = processors(history, logits[None].clone())
        torch.testing.assert_close(sampler.process(logits), scores, rtol=0, atol=0)
        expected = scores.argmax(-1) if greedy else torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]
        assert sampler(logits) == int(expected)
        history = torch.cat((history, expected.view(1, 1)), dim=1)
    assert len(set(history[0].tolist())) < 30  # the penalty was exercised
    assert all(t not in talker.suppress_tokens for t in sampler.history)


def test_rows_sampled_together_draw_what_each_sampler_draws_alone(talker):
    """`sample_rows` (a Talker step's rows, processed in one call per set of processors) gives each row the scores
    and the token its sampler alone gives: greedy and sampled rows, with and without a repetition penalty, histories
    of different lengths (one empty at first), for longer than the history's first buffer."""
    params = [default_talker_sampling(greedy=True), default_talker_sampling(greedy=True),
              default_talker_sampling(seed=7), default_talker_sampling(seed=8), SamplingParams(greedy=True),
              default_talker_sampling(greedy=True)]

    def samplers():
        return [Sampler(p, talker.suppress_tokens) for p in params]

    together, alone = samplers(), samplers()
    logits_rng = torch.Generator().manual_seed(11)
    for step in range(100):
        rows = [0, 2, 4] if step < 5 else list(range(len(params)))  # the others join later: shorter histories
        logits = torch.randn(len(rows), 3072, generator=logits_rng) + 6 * (torch.arange(3072) % 89 == 0)
        scores = process_rows([together[r] for r in rows], logits)
        for i, r in enumerate(rows):
            assert torch.equal(scores[i:i + 1], alone[r].process(logits[i])), (step, r)
        got = sample_rows([together[r] for r in rows], logits)
        assert got == [alone[r](logits[i]) for i, r in enumerate(rows)], step
    assert [s.history for s in together] == [s.history for s in alone]
    assert len(set(together[0].history)) < 50  # repeats: the penalty was exercised


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 4), st.integers(1, 300), st.integers(0, 2**31 - 1), st.sampled_from(["ties", "inf", "nan"]))
def test_greedy_ids_are_generates_argmax(rows, vocab, seed, extreme):
    """`greedy_ids` (`max`, 3x faster) picks `argmax`'s id in every row: the first maximal one, with ties, infinities
    and NaNs, and on the Thinker's vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-2, 3, (rows, vocab), generator=gen).float()  # few values: many ties
    where = torch.rand(rows, vocab, generator=gen) < 0.1
    scores[where] = {"ties": 2.0, "inf": float("inf"), "nan": float("nan")}[extreme]
    scores[0, torch.rand(vocab, generator=gen) < 0.5] = -float("inf")
    assert torch.equal(greedy_ids(scores), scores.argmax(dim=-1))
    wide = torch.randn(rows, 152064, generator=gen)
    wide[:, ::7] = wide.max()  # ties at the top
    assert torch.equal(greedy_ids(wide), wide.argmax(dim=-1))


def test_default_talker_sampling_is_generates(reference):
    defaults = {k: v.default for k, v in inspect.signature(type(reference).generate).parameters.items()}
    params = default_talker_sampling()
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty, not params.greedy) == (
        defaults["talker_temperature"], defaults["talker_top_k"], defaults["talker_top_p"],
        defaults["talker_repetition_penalty"], defaults["talker_do_sample"],
    )


def test_sampling_params_validation():
    with pytest.raises(InvalidInput, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(InvalidInput, match="temperature"):
        SamplingParams(temperature=0)


@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_mtp_replayed_frames_give_the_eager_steps_bits(mtp, talker, rows):
    """A frame replayed from traces (`services.engines.replay`: a batch of greedy rows as one whole frame, one with
    sampled rows step by step) gives the codes and embedding sums of the same steps run eagerly, bit for bit, at
    every scale, for each size bucket; and the traces are what ran."""
    eager = MTPEngine(mtp.predictor, mtp.c0_embedding, mtp.device, replay=False)
    gen = torch.Generator().manual_seed(100 + rows)
    mixed = [i % 2 == 1 for i in range(rows)]  # rows = 1: the one row sampled

    def gens(flags):
        return [None if g else torch.Generator().manual_seed(50 + i) for i, g in enumerate(flags)]

    for scale in (0.1, 1.0, 30.0):
        hidden = scale * torch.randn(rows, talker.codec_head.in_features, generator=gen)
        c0 = torch.randint(0, mtp.vocab_size, (rows,), generator=gen)
        for flags in ([True] * rows, mixed):
            got, want = (engine.predict(hidden, c0, flags, gens(flags)) for engine in (mtp, eager))
            assert torch.equal(got.codes, want.codes) and torch.equal(got.embed_sum, want.embed_sum)
    bucket = rows if rows <= 8 else 16  # sizes up to 8 as they are, then powers of two
    assert bucket in mtp._greedy.traced() and all(bucket in step.traced() for step in mtp._steps)
    assert not eager._greedy.traced() and not any(step.traced() for step in eager._steps)


def test_mtp_replays_modules_handed_to_it_with_grad_on(mtp, talker):
    """Benchmarks build the engine from fresh modules, whose weights require grad: it still traces (a trace keeps
    weights as constants, which must not), rather than falling back to eager steps."""
    predictor = copy.deepcopy(mtp.predictor).requires_grad_(True)
    c0_embedding = torch.nn.Embedding.from_pretrained(mtp.c0_embedding.weight.clone(), freeze=False)
    engine = MTPEngine(predictor, c0_embedding, mtp.device)
    hidden = torch.randn(2, talker.codec_head.in_features, generator=torch.Generator().manual_seed(3))
    c0 = torch.tensor([1, 2])
    assert torch.equal(engine.predict(hidden, c0).codes, mtp.predict(hidden, c0).codes)
    assert engine._greedy.traced() == {2}
