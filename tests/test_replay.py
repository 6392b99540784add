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
    assert warm._steady.replays.traced() == {1, 2, 3}
    gen = torch.Generator().manual_seed(4)
    for size in (3, 2):
        streams = [[engine.stream() for _ in range(size)] for engine in (warm, cold)]
        for _ in range(3):  # the first frame, then steady ones
            codes = torch.randint(0, 64, (size, warm.num_quantizers), generator=gen)
            ours, theirs = (push_batch(s, codes) for s in streams)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert warm._steady.replays.traced() == {1, 2, 3}

    warm, cold = (MTPEngine.from_checkpoint(tiny_ckpt) for _ in range(2))
    warm.warm(3)  # buckets of 1, 2 and 4 rows
    assert warm._greedy.traced() == {1, 2, 4} and all(step.traced() == {1, 2, 4} for step in warm._steps)
    hidden = torch.randn(3, warm.c0_embedding.embedding_dim, generator=gen)
    c0 = torch.randint(0, warm.vocab_size, (3,), generator=gen)
    for flags in ([True] * 3, [True, False, False]):
        ours, theirs = (engine.predict(hidden, c0, flags, [None if g else torch.Generator().manual_seed(i)
                                                           for i, g in enumerate(flags)]) for engine in (warm, cold))
        assert torch.equal(ours.codes, theirs.codes) and torch.equal(ours.embed_sum, theirs.embed_sum)
    assert warm._greedy.traced() == {1, 2, 4}
