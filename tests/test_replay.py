"""`services.engines.replay`: a function's ops recorded once per key and replayed, the same bits; where tracing
fails, the function runs eagerly and says so once."""

from __future__ import annotations

import logging

import torch

from services.engines.replay import Replays


def _scaled_sum(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    counts.add_(1)  # a tensor the function reads but does not take: kept by reference, written by every replay
    return (x.sin() * counts).sum(dim=-1)


def test_replays_give_the_functions_bits_per_key():
    counts = torch.zeros(())
    replays = Replays("test", lambda x: _scaled_sum(x, counts))
    gen = torch.Generator().manual_seed(0)
    for shape in ((2, 5), (3, 7), (2, 5), (3, 7)):
        x = torch.randn(shape, generator=gen)
        again = shape in replays.traced()
        before = counts.clone()
        got = replays(shape, x)
        assert torch.equal(got, (x.sin() * counts).sum(dim=-1))  # the eager ops' bits, with what the replay wrote
        if again:  # a replay runs the ops once (tracing ran them once more)
            assert counts == before + 1
    assert replays.traced() == {(2, 5), (3, 7)}


def test_without_tracing_the_function_runs_eagerly(monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("no TorchScript here")

    monkeypatch.setattr(torch.jit, "trace", refuse)
    replays = Replays("test", torch.sin)
    x = torch.randn(4, generator=torch.Generator().manual_seed(1))
    with caplog.at_level(logging.WARNING, logger="services.engines.replay"):
        assert torch.equal(replays("k", x), torch.sin(x))
        assert torch.equal(replays("k", x), torch.sin(x))
    assert not replays.enabled and not replays.traced()
    assert [r.getMessage() for r in caplog.records] == [
        "test: torch.jit.trace failed (no TorchScript here); its steps run eagerly"]


def test_engines_warmed_up_to_a_batch_size_trace_nothing_on_a_frames_path_and_give_the_same_bits(tiny_ckpt):
    """MTP's and Code2Wav's replicas trace their steps up to `warm_batch` at startup (`Engines.warm` does the same
    in process): then frames of those sizes make no trace on their path, and give a cold engine's bits."""
    from services.engines.code2wav import Code2WavEngine, push_batch
    from services.engines.mtp import MTPEngine

    warm, cold = (Code2WavEngine.from_checkpoint(tiny_ckpt) for _ in range(2))
    warm.warm(3)
    assert warm._frames.steady.traced() == warm._frames.first.traced() == {1, 2, 3}
    gen = torch.Generator().manual_seed(4)
    for size in (3, 2):
        streams = [[engine.stream() for _ in range(size)] for engine in (warm, cold)]
        for _ in range(3):  # the first frame, then steady ones
            codes = torch.randint(0, 64, (size, warm.num_quantizers), generator=gen)
            ours, theirs = (push_batch(s, codes) for s in streams)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert warm._frames.steady.traced() == warm._frames.first.traced() == {1, 2, 3}

    warm, cold = (MTPEngine.from_checkpoint(tiny_ckpt) for _ in range(2))
    warm.warm(3)  # frames of 1, 2 and 3 rows (sizes up to 8 run as they are)
    assert warm._greedy.traced() == {1, 2, 3} and all(step.traced() == {1, 2, 3} for step in warm._steps)
    hidden = torch.randn(3, warm.c0_embedding.embedding_dim, generator=gen)
    c0 = torch.randint(0, warm.vocab_size, (3,), generator=gen)
    for flags in ([True] * 3, [True, False, False]):
        ours, theirs = (engine.predict(hidden, c0, flags, [None if g else torch.Generator().manual_seed(i)
                                                           for i, g in enumerate(flags)]) for engine in (warm, cold))
        assert torch.equal(ours.codes, theirs.codes) and torch.equal(ours.embed_sum, theirs.embed_sum)
    assert warm._greedy.traced() == {1, 2, 3}


def _ids(filler: int) -> torch.Tensor:
    """A one-turn prompt ending with '<|im_start|>assistant\\n', `filler` text tokens long in its user part."""
    return torch.tensor([151644, 872, 198, *range(9707, 9707 + filler), 151645, 198, 151644, 77091, 198])


def test_decode_steps_replay_warm_traces_at_every_cache_length_with_the_eager_steps_bits(tiny_ckpt):
    """The Thinker's and the Talker's decode steps replay one trace per batch size (`KVPool.step`), made from dummy
    inputs at startup (`warm`): requests of different lengths and rope deltas, their caches crossing many pages, one
    reading its pages in place and one whose pages lie scattered, give the eager steps' bits, and no step traces."""
    from services.config import KVConfig
    from services.engines.talker import TEXT_END, TalkerEngine, TalkerPrompt, default_talker_sampling
    from services.engines.thinker import ThinkerEngine, ThinkerPrompt

    kv = KVConfig(kv_tokens=4096, page_size=4)
    traced = {(1, True), (1, False), (2, False), (3, False)}
    warm, cold = (ThinkerEngine.from_checkpoint(tiny_ckpt, kv=kv, replay=replay) for replay in (True, False))
    warm.warm(3)
    assert warm.kv.traced() == traced and not cold.kv.traced()
    gen = torch.Generator().manual_seed(5)
    rows = []
    for filler in (1, 9, 22):
        for engine in (warm, cold):  # the last one's first page is a one-page hole: its pages lie scattered
            if filler == 22:
                hole, _ = engine.kv.reserve(4), engine.kv.reserve(4)
                hole.close()
        rows.append([engine.prefill(ThinkerPrompt(input_ids=_ids(filler)), 60)[0] for engine in (warm, cold)])
    pages = rows[2][0].kv.pages
    assert pages != list(range(pages[0], pages[0] + len(pages)))
    for step in range(50):  # 3 rows, then 2, then the scattered one alone
        live = rows if step < 20 else rows[:2] if step < 35 else rows[2:]
        tokens = torch.randint(0, 1000, (len(live),), generator=gen).tolist()
        ours, theirs = (engine.decode_batch([r[i] for r in live], tokens) for i, engine in enumerate((warm, cold)))
        assert torch.equal(ours, theirs), step
    alone = [engine.prefill(ThinkerPrompt(input_ids=_ids(3)), 30)[0] for engine in (warm, cold)]
    for _ in range(20):  # one request's run of pages, read in place
        token = int(torch.randint(0, 1000, (), generator=gen))
        assert torch.equal(warm.decode(alone[0], token), cold.decode(alone[1], token))
    assert warm.kv.traced() == traced

    warm, cold = (TalkerEngine.from_checkpoint(tiny_ckpt, kv=kv, replay=replay) for replay in (True, False))
    warm.warm(3)
    assert warm.kv.traced() == traced
    greedy = default_talker_sampling(greedy=True)
    sessions = [[engine.prefill(TalkerPrompt(input_ids=_ids(filler)), 100, greedy, max_new_tokens=60)[0]
                 for engine in (warm, cold)] for filler in (2, 13, 30)]
    for step in range(40):
        live = sessions if step < 25 else sessions[1:2]
        codec = torch.randn(len(live), warm.model.config.hidden_size, generator=gen)
        tokens = [t if step < 10 else TEXT_END for t in torch.randint(0, 1000, (len(live),), generator=gen).tolist()]
        ours, theirs = (engine.step_batch([s[i] for s in live], codec, tokens) for i, engine in enumerate((warm, cold)))
        for a, b in zip(ours, theirs, strict=True):
            assert a.c0 == b.c0 and torch.equal(a.hidden, b.hidden), step
    assert warm.kv.traced() == traced
