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
