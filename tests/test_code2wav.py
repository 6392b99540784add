"""Code2Wav engine: full decode == the reference's forward; any chunking of a stream == the full decode."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as ref

from services.checkpoint.loading import Checkpoint
from services.engines.code2wav import Code2WavEngine, _snake, push_batch
from services.errors import InvalidInput

FRAMES = 310  # beyond the 72-frame attention window, many times over


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # One frame is a few tiny ops per layer; two OpenMP threads on a busy 2-core machine make each one ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return Code2WavEngine.from_checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def loud(engine):
    """The tiny model re-initialised so its waveform is O(0.25) instead of the checkpoint's O(1e-6): an absolute
    1e-4 tolerance then means something, and float32 stays ~1e-6 from float64 (layer gains below 1)."""
    module = copy.deepcopy(engine.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.5 * p[0].numel() ** -0.5, generator=g)
            elif "scale" in name or "gamma" in name:
                p.fill_(0.5)
            elif "alpha" in name or "beta" in name:
                p.normal_(0, 0.3, generator=g)
        loud = Code2WavEngine(module)
        module.decoder[-1].conv.weight.mul_(0.25 / loud.decode(random_codes(50, seed=0)).std())
    return loud


def random_codes(frames: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed))


def run_stream(engine: Code2WavEngine, codes: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    stream = engine.stream()
    outs, start = [], 0
    for n in sizes:
        outs.append(stream.push(codes[start : start + n]))
        start += n
    assert start == codes.shape[0]
    outs.append(stream.finish())
    return outs


def chunking(name: str, frames: int) -> list[int]:
    if name == "all":
        return [frames]
    if name == "random":
        rng, sizes = random.Random(0), []
        while sum(sizes) < frames:
            sizes.append(min(rng.choice([1, 2, 3, 5, 13, 40, 90]), frames - sum(sizes)))
        return sizes
    n = int(name)
    return [n] * (frames // n) + ([frames % n] if frames % n else [])


def test_decode_matches_reference(engine, reference):
    codes = random_codes(120, seed=1)
    wav = engine.decode(codes)
    with torch.no_grad():
        expected = reference.code2wav(codes.T[None])[0, 0]  # the reference takes [batch, 16, frames]
    assert wav.shape == (120 * 1920 - 555,) == (engine.num_samples(120),)
    torch.testing.assert_close(wav, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["1", "7", "random", "all"])
def test_stream_equals_full(loud, name):
    codes = random_codes(FRAMES, seed=2)
    full = loud.decode(codes)
    assert full.abs().max() > 0.5  # a real signal, not the near-silence of tiny random weights
    outs = run_stream(loud, codes, chunking(name, FRAMES))
    streamed = torch.cat(outs)
    assert streamed.shape == full.shape
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-4)


def test_stream_equals_full_on_checkpoint_weights(engine):
    codes = random_codes(100, seed=3)
    full = engine.decode(codes)
    streamed = torch.cat(run_stream(engine, codes, chunking("random", 100)))
    torch.testing.assert_close(streamed, full, rtol=0, atol=1e-4 * full.abs().max().item())


@pytest.mark.parametrize("channels, samples", [(1536, 3), (96, 1920), (48, 5)])
def test_the_streams_snake_activation_is_the_references_bit_for_bit(channels, samples):
    snake = ref.Qwen3OmniMoeSnakeBeta(channels)
    generator = torch.Generator().manual_seed(channels)
    with torch.no_grad():
        snake.alpha.normal_(0, 0.5, generator=generator)
        snake.beta.normal_(0, 0.5, generator=generator)
    x = torch.randn(3, channels, samples, generator=generator) * 4
    with torch.inference_mode():
        for _ in range(2):  # the second time from the factors it kept
            assert torch.equal(_snake(snake, x), snake(x))
    with torch.no_grad():
        snake.beta.add_(0.25)  # new weights: new factors
    with torch.inference_mode():
        assert torch.equal(_snake(snake, x), snake(x))


def test_each_frame_holds_back_555_samples_and_finish_adds_nothing(loud):
    codes = random_codes(5, seed=4)
    outs = run_stream(loud, codes, [1, 1, 3])
    assert [o.numel() for o in outs] == [1920 - 555, 1920, 3 * 1920, 0]
    assert loud.held_samples == 555 and loud.samples_per_frame == 1920 and loud.sample_rate == 24000


def test_state_stays_bounded(loud):
    stream = loud.stream()
    codes = random_codes(150, seed=5)
    sizes = []
    for i in range(150):
        stream.push(codes[i : i + 1])
        sizes.append(
            [keys.shape[-2] for keys in stream._window.keys]
            + [s.tail.shape[-1] for s in stream._state.values()]
        )
    assert max(size[0] for size in sizes) == 71  # sliding window 72, minus the current frame
    assert sizes[100] == sizes[-1]  # nothing grows once the window is full


def test_interleaved_streams_are_independent(loud):
    a_codes, b_codes = random_codes(90, seed=6), random_codes(90, seed=7)
    a, b = loud.stream(), loud.stream()
    a_out, b_out = [], []
    for i in range(0, 90, 9):
        a_out.append(a.push(a_codes[i : i + 9]))
        b_out.append(b.push(b_codes[i : i + 3]))
        b_out.append(b.push(b_codes[i + 3 : i + 9]))
    torch.testing.assert_close(torch.cat(a_out), loud.decode(a_codes), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cat(b_out), loud.decode(b_codes), rtol=0, atol=1e-4)


def test_batched_streams_equal_each_stream_alone(loud):
    """Streams that join at different frames (so their windows hold different lengths, some full, some not) share
    `push_batch` forwards, one frame each, and leave at different frames; streams that start together share their
    first frame's: each gets its own full decode."""
    starts, lengths = [0, 0, 0, 5, 30, 80], [150, 40, 3, 120, 90, 20]
    codes = [random_codes(n, seed=20 + i) for i, n in enumerate(lengths)]
    streams = [loud.stream() for _ in starts]
    outs = [[] for _ in starts]
    batch_sizes = {"new": [], "steady": []}
    for t in range(max(s + n for s, n in zip(starts, lengths))):
        ready = [i for i, (s, n) in enumerate(zip(starts, lengths)) if s <= t < s + n]
        phases = {i: streams[i].phase for i in ready}
        for phase in ("new", "steady"):  # a batch never mixes new streams with steady ones
            rows = [i for i in ready if phases[i] == phase]
            if rows:
                frames = torch.stack([codes[i][streams[i].frames] for i in rows])
                for i, samples in zip(rows, push_batch([streams[i] for i in rows], frames)):
                    outs[i].append(samples)
                batch_sizes[phase].append(len(rows))
    assert max(batch_sizes["new"]) == 3 and max(batch_sizes["steady"]) == 4
    for i, c in enumerate(codes):
        torch.testing.assert_close(torch.cat(outs[i]), loud.decode(c), rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="all new or all past their first frame"):
        push_batch([loud.stream(), streams[0]], random_codes(2, seed=1))


def test_a_kept_stack_gives_what_restacking_gives(loud):
    """Streams pushed together frame after frame keep their state stacked (in whatever order the batch comes), and
    one that is pushed alone, or leaves and comes back, takes its row back: every frame's samples are those of
    streams whose state is split and stacked again at every push, bit for bit, and each stream's its decode's."""
    codes = [random_codes(40, seed=40 + i) for i in range(4)]
    kept, restacked = ([loud.stream() for _ in codes] for _ in "ab")
    outs = [[] for _ in codes]
    order = torch.Generator().manual_seed(0)
    for t in range(40):
        ready = [i for i in range(4) if not (i == 3 and 10 <= t < 20)]  # stream 3 sits out ten frames
        ready = [ready[i] for i in torch.randperm(len(ready), generator=order)]
        if t in (25, 26):  # stream 0 alone, then the others
            groups = [ready[:1], ready[1:]] if ready[0] == 0 else [[0], [i for i in ready if i]]
        else:
            groups = [ready]
        for rows in groups:
            frames = torch.stack([codes[i][kept[i].frames] for i in rows])
            for stream in restacked:
                stream._detach()
            got = push_batch([kept[i] for i in rows], frames)
            want = push_batch([restacked[i] for i in rows], frames)
            for i, a, b in zip(rows, got, want, strict=True):
                assert torch.equal(a, b)
                outs[i].append(a)
        if t >= 1:
            assert kept[1]._batch is not None and kept[1]._batch.size == len(groups[-1])
    assert [s.frames for s in kept] == [40, 40, 40, 30]
    for i, c in enumerate(codes):
        torch.testing.assert_close(torch.cat(outs[i]), loud.decode(c[:kept[i].frames]), rtol=0, atol=1e-4)


def test_replayed_frames_give_the_eager_bits(loud):
    """First and steady frames replayed from a trace per batch size (`services.engines.replay`) give the samples of
    the same frames run eagerly, bit for bit, with streams that join, sit out and come back (other batch sizes); and
    the traces are what ran."""
    eager = Code2WavEngine(loud.model, replay=False)
    codes = [random_codes(30, seed=60 + i) for i in range(3)]
    replayed, plain = ([engine.stream() for _ in codes] for engine in (loud, eager))
    for t in range(30):
        rows = [0, 1, 2] if t < 8 or t >= 20 else [0, 2]  # stream 1 sits out twelve frames
        for streams in (replayed, plain):
            assert len({streams[i].phase for i in rows}) == 1
        frames = torch.stack([codes[i][replayed[i].frames] for i in rows])
        got = push_batch([replayed[i] for i in rows], frames)
        want = push_batch([plain[i] for i in rows], frames)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    assert loud._frames.steady.traced() >= {2, 3} and loud._frames.first.traced() >= {3}
    assert not eager._frames.steady.traced() and not eager._frames.first.traced()


def test_loads_only_code2wav_tensors(tiny_ckpt_sharded):
    ckpt = Checkpoint.open(tiny_ckpt_sharded)
    engine = Code2WavEngine.from_checkpoint(ckpt)
    assert ckpt.read_log and all(name.startswith("code2wav.") for name in ckpt.read_log)
    assert sorted(ckpt.read_log) == sorted(ckpt.names("code2wav."))
    assert engine.decode(random_codes(3, seed=8)).shape == (3 * 1920 - 555,)


def test_parameter_bytes(engine):
    tensors = list(engine.model.parameters()) + list(engine.model.buffers())
    assert engine.parameter_bytes == sum(t.numel() * t.element_size() for t in tensors) > 0
    assert engine.num_quantizers == 16 and engine.codebook_size == 2048


@pytest.mark.parametrize(
    "codes, message",
    [
        (torch.full((2, 16), 2048), "outside the codebook"),
        (torch.full((2, 16), -1), "outside the codebook"),
        (torch.zeros(2, 15, dtype=torch.long), r"shape \[frames, 16\]"),
        (torch.zeros(16, dtype=torch.long), r"shape \[frames, 16\]"),
        (torch.zeros(2, 16, 1, dtype=torch.long), r"shape \[frames, 16\]"),
        (torch.zeros(2, 16), "integer"),
        (torch.zeros(2, 16, dtype=torch.bool), "integer"),
        ([[0] * 16], "torch.Tensor"),
    ],
)
def test_bad_codes(engine, codes, message):
    with pytest.raises(InvalidInput, match=message):
        engine.decode(codes)
    with pytest.raises(InvalidInput, match=message):
        engine.stream().push(codes)


def test_empty_push_and_push_after_finish(engine):
    stream = engine.stream()
    assert stream.push(torch.zeros(0, 16, dtype=torch.long)).numel() == 0
    assert stream.push(random_codes(2, seed=9)).numel() == 2 * 1920 - 555
    assert stream.finish().numel() == 0
    with pytest.raises(InvalidInput, match="finished"):
        stream.push(random_codes(1, seed=9))
