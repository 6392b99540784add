"""Code2Wav engine: frames of 16 codec codes in, 24 kHz waveform out, whole or incrementally.

The math is transformers' `Qwen3OmniMoeCode2Wav`, loaded from `code2wav.*` only. `decode` is its full forward.
`stream()` runs the same submodules frame by frame with explicit per-layer state (Moshi's StreamingModule idea),
and the concatenation of everything a stream returns equals `decode` of all its frames, in any chunking:

- pre-transformer: causal sliding-window attention over `sliding_window` (72) frames. The state is the last 71
  keys/values per layer (RoPE already applied, as transformers' sliding `DynamicCache` keeps them) plus the frame
  count, from which the absolute RoPE positions and the window mask follow.
- `Qwen3OmniMoeCausalConvNet` (stride 1 everywhere in Code2Wav): the full forward left-pads `kernel - 1` zeros
  (dilated kernel) and adds no right padding, so the state is the last `kernel - 1` inputs, zeros at the start.
- `Qwen3OmniMoeCausalTransConvNet` (kernel k, stride s): the full output is trimmed by `k - s` samples on each
  side. Input t writes output samples [t*s, t*s + k), so after input t the first (t+1)*s samples are final and
  the last `k - s` are partial sums that input t+1 completes. The state is that overlap, plus how many of the
  first `k - s` samples are still to drop.
- ConvNeXt blocks (depthwise causal conv), residual units and SnakeBeta: pointwise apart from their causal convs.

Latency. The upsampling transposed convs have k == s (no overlap); each decoder block's has k = 2s, so it holds
back s samples at its output rate, which the rest of the decoder multiplies by its later upsampling: with
`upsample_rates` [8, 5, 4, 3] that is 8*60 + 5*12 + 4*3 + 3 = 555 samples (23 ms). So frame t's last 555 of
1920 samples wait for frame t+1 (the first push yields 1920 - 555 = 1365 samples, later frames 1920 each); the
model has no other look-ahead. The full forward trims exactly those held-back tails (N frames give
N*1920 - 555 samples), so `finish()` emits nothing: the stream has already returned every sample of the full
forward.

Batching (Moshi's per-slot streaming state): each stream keeps its own state; `push_batch` stacks the states of
streams along the batch and runs one forward over their next frames (each stream's window padded and masked). The
state stays stacked while the same streams are pushed together again, in any order (concurrent turns do so frame
after frame: splitting and stacking it at each was 7% of a step of 6); a stream pushed in other company first takes
its row back as its own state. Streams in one batch are all at their first frame or all past it: the first frame is
the one whose transposed convs still trim their output, the same trim for every new stream, so new streams (turns
that start together) share a forward too, but never one with older streams, whose rows would not line up. A push
of one frame per stream runs its convolutions from a trace per batch size, one for first frames and one for steady
frames (`_FrameDecoder`, `services.engines.replay`): the same ops, without the GIL.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as ref

from services.checkpoint.loading import Checkpoint, load_pretrained_part, parameter_bytes
from services.config import EngineConfig
from services.engines.replay import Replays
from services.errors import CheckpointError, InvalidInput

PREFIX = "code2wav."
SAMPLE_RATE = 24_000  # Code2Wav's output rate; not in its config
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class Code2WavEngine:
    def __init__(self, module: nn.Module, config: EngineConfig = EngineConfig(), replay: bool = True):
        """module: a `Qwen3OmniMoeCode2Wav` (loaded, or with random weights for benchmarks), its weights fixed from
        the first frame on (traces keep what they read); `replay`: False runs every frame eagerly (the tests
        compare the two)."""
        # Inference only; and a trace keeps the weights as constants (`_FrameDecoder`), which must not need grad.
        self.model = module.to(device=config.device, dtype=config.torch_dtype).eval().requires_grad_(False)
        self.config = config
        c = module.config
        self.sample_rate = SAMPLE_RATE
        self.samples_per_frame = int(module.total_upsample)
        self.num_quantizers: int = c.num_quantizers
        self.codebook_size: int = c.codebook_size
        self.held_samples = _held_samples(module)
        self.parameter_bytes = parameter_bytes(module)
        self.stateful = _stateful(self.model)  # the modules with streaming state: every state dict's order
        self._frames = _FrameDecoder(self.model, self.stateful, replay)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint | str | Path, config: EngineConfig = EngineConfig()) -> "Code2WavEngine":
        ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)
        module = load_pretrained_part(
            ref.Qwen3OmniMoeCode2Wav, ckpt.config.code2wav_config, ckpt.read(PREFIX), config.device, config.torch_dtype
        )
        return cls(module, config)

    def num_samples(self, frames: int) -> int:
        """Length of the full forward's output for `frames` frames."""
        return max(frames * self.samples_per_frame - self.held_samples, 0)

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """codes: [T, num_quantizers] -> float32 waveform [T*1920 - 555], the reference's full forward."""
        codes = self.check_codes(codes)
        if codes.shape[0] == 0:
            return self._empty()
        # The reference takes [batch, num_quantizers, T] and returns [batch, 1, samples].
        return self.model(codes.T[None])[0, 0].float()

    def stream(self) -> "Code2WavStream":
        return Code2WavStream(self)

    def warm(self, max_batch: int = 1) -> None:
        """Trace the first and the steady frame of each batch size up to `max_batch` streams now, not on a turn's
        path (70 ms each at the tiny checkpoint's widths, 1.4 s up to 8 streams); larger sizes are traced at their
        first frames."""
        for size in range(1, max(1, max_batch) + 1):
            streams = [self.stream() for _ in range(size)]
            codes = torch.zeros(size, self.num_quantizers, dtype=torch.long, device=self.config.device)
            for _ in range(2):  # the first frame (it trims), then a steady one
                push_batch(streams, codes)

    def check_codes(self, codes: Tensor) -> Tensor:
        """Validate [n, num_quantizers] integer codes in [0, codebook_size); return them as int64 on the device."""
        if not isinstance(codes, Tensor):
            raise InvalidInput(f"codes must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dtype not in _INT_DTYPES:
            raise InvalidInput(f"codes must be integer codec ids, got dtype {codes.dtype}")
        if codes.ndim != 2 or codes.shape[1] != self.num_quantizers:
            raise InvalidInput(f"codes must have shape [frames, {self.num_quantizers}], got {list(codes.shape)}")
        bad = (codes < 0) | (codes >= self.codebook_size)
        if bad.any():
            frame, quantizer = (int(i) for i in bad.nonzero()[0])
            raise InvalidInput(
                f"code {int(codes[frame, quantizer])} at frame {frame}, quantizer {quantizer} "
                f"is outside the codebook [0, {self.codebook_size})"
            )
        return codes.to(device=self.config.device, dtype=torch.long)

    def _empty(self) -> Tensor:
        return torch.zeros(0, device=self.config.device)


@dataclass
class _State:
    """A causal conv's or transposed conv's streaming state, stacked along the batch."""

    # conv: [B, C_in, kernel - 1], the last inputs (which the full forward's left padding starts as); transposed
    # conv: [B, C_out, k - s], partial outputs that the next input completes (bias not yet added)
    tail: Tensor
    to_drop: int = 0  # transposed conv: how many of the first output samples the full forward still trims


@dataclass
class _Window:
    """The pre-transformer's sliding attention state, per layer: the last `window - 1` keys and values (RoPE
    applied) of the stream, [B, kv_heads, w, head_dim]."""

    keys: list[Tensor]
    values: list[Tensor]


class Code2WavStream:
    """One utterance's incremental decode. State is bounded: per layer a sliding KV window, per conv its kernel
    context, per transposed conv its overlap, so a frame costs the same at frame 10 and at frame 10,000.
    `push_batch` runs the next frame of several streams as one forward."""

    def __init__(self, engine: Code2WavEngine):
        self.engine = engine
        self.model = engine.model
        self.frames = 0
        self.samples = 0
        self.finished = False
        like = self.model.code_embedding.weight
        c = self.model.config
        heads = c.num_key_value_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        empty = like.new_zeros(1, heads, 0, head_dim)
        self._window = _Window([empty] * c.num_hidden_layers, [empty] * c.num_hidden_layers)
        self._state: dict[nn.Module, _State] = {}  # its own, unless `_batch` holds it
        self._batch: _Batch | None = None  # the stacked state of the streams it was last pushed with, and its row
        self._row = 0
        for m in engine.stateful:
            if isinstance(m, ref.Qwen3OmniMoeCausalConvNet):
                self._state[m] = _State(like.new_zeros(1, m.conv.in_channels, m.kernel_size - 1))
            else:
                pending = m.conv.kernel_size[0] - m.conv.stride[0]
                self._state[m] = _State(like.new_zeros(1, m.conv.out_channels, pending), m.left_pad)

    @property
    def steady(self) -> bool:
        """Past its first frame: no transposed conv trims its output any more, so the stream's next frame can share
        a forward with other steady streams' (`push_batch`)."""
        states = self._state if self._batch is None else self._batch.states  # to_drop: the same for every row
        return all(st.to_drop == 0 for st in states.values())

    @property
    def phase(self) -> str | None:
        """Which streams this one's next frame can share a forward with (`push_batch`): "new" ones (no frame yet),
        "steady" ones, or none (finished, or part way through a first push's trim)."""
        if self.finished:
            return None
        return "steady" if self.steady else "new" if self.frames == 0 else None

    def push(self, codes: Tensor) -> Tensor:
        """codes: [n, num_quantizers] -> every waveform sample [k] that these frames make final (float32)."""
        if self.finished:
            raise InvalidInput("this Code2Wav stream is finished; start a new one")
        codes = self.engine.check_codes(codes)
        if codes.shape[0] == 0:
            return self.engine._empty()
        return _push([self], codes[None])[0]

    def finish(self) -> Tensor:
        """End of the utterance: the full forward trims the held-back tails, so nothing is left to emit."""
        self.finished = True
        self._window, self._state, self._batch = None, {}, None
        return self.engine._empty()

    def _detach(self) -> None:
        """This stream's row of the stacked state it was last pushed in, as its own state again."""
        if self._batch is None:
            return
        for m, state in self._batch.states.items():
            self._state[m] = _State(state.tail[self._row:self._row + 1], state.to_drop)
        self._batch = None


@dataclass(eq=False)
class _Batch:
    """The state of the streams last pushed together, stacked along the batch (row i: the stream whose `_row` is
    i). Kept while those streams are pushed together again: no split into each stream's and stack per frame."""

    states: dict
    size: int


def push_batch(streams: list[Code2WavStream], codes: Tensor) -> list[Tensor]:
    """The next frame of each stream (codes [B, num_quantizers], checked), one forward for all: each stream gets
    the samples its own `push` would give (up to float rounding). The streams share a `phase`: all new, or all past
    their first frame."""
    phases = {s.phase for s in streams}
    if len(streams) > 1 and (None in phases or len(phases) > 1):
        raise ValueError("push_batch takes unfinished streams that are all new or all past their first frame")
    return _push(streams, codes[:, None])


@torch.inference_mode()
def _push(streams: list[Code2WavStream], codes: Tensor) -> list[Tensor]:
    """codes [B, n, Q]: n frames of each stream, run with their state stacked along the batch (`_stacked`)."""
    model = streams[0].model
    n = codes.shape[1]
    states, rows = _stacked(streams)
    if rows != list(range(len(streams))):  # the kept stack's rows, in another order: run them in its order
        order = sorted(range(len(streams)), key=rows.__getitem__)
        streams, codes = [streams[i] for i in order], codes[order]
    hidden = model.code_embedding(codes.transpose(1, 2) + model.code_offset).mean(1)  # [B, n, hidden]
    hidden = _pre_transformer(model, streams, hidden).permute(0, 2, 1)  # [B, hidden, n]
    decoder = streams[0].engine._frames
    first = streams[0].frames == 0
    if n == 1 and (streams[0].steady or first and decoder.first_is_whole):  # the same ops at every such push
        wav = decoder(hidden, states, first)
    else:
        wav = _decoder(model, hidden, states)
    for stream in streams:
        stream.frames += n
        stream.samples += wav.shape[1]
    return [wav[row] for row in rows]


def _pre_transformer(model: nn.Module, streams: list[Code2WavStream], hidden: Tensor) -> Tensor:
    """The sliding-window transformer over each stream's next positions, with each stream's own window."""
    n = hidden.shape[1]
    keep = model.config.sliding_window - 1
    frames = torch.tensor([s.frames for s in streams], device=hidden.device)
    lengths = [s._window.keys[0].shape[2] for s in streams]
    width = max(lengths)
    cache = _WindowStep(streams, width, keep)
    # Key j of the [width + n] run: the last n are the new positions, before them each stream's window, left-padded.
    j = torch.arange(width + n, device=hidden.device)
    query = torch.arange(n, device=hidden.device) + width  # [n]
    valid = j[None] >= (width - torch.tensor(lengths, device=hidden.device))[:, None]  # [B, keys]
    causal = (j[None] <= query[:, None]) & (query[:, None] - j[None] <= keep)  # [n, keys]
    mask = (valid[:, None, :] & causal[None])[:, None]  # [B, 1, n, keys]
    positions = frames[:, None] + torch.arange(n, device=hidden.device)
    masks = {"full_attention": mask, "sliding_attention": mask}
    out = model.pre_transformer(inputs_embeds=hidden, position_ids=positions, attention_mask=masks,
                                past_key_values=cache, use_cache=True).last_hidden_state
    return out


class _WindowStep:
    """The pre-transformer's cache for one `_push`: each layer's keys/values are the streams' windows, left-padded
    to one width, then the new ones; afterwards each stream keeps its last `keep` valid entries."""

    is_compileable = False

    def __init__(self, streams: list[Code2WavStream], width: int, keep: int):
        self.streams, self.width, self.keep = streams, width, keep

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *_args, **_kwargs) -> tuple[Tensor, Tensor]:
        out = []
        for store, new in (("keys", key), ("values", value)):
            rows = []
            for row, stream in enumerate(self.streams):
                old = getattr(stream._window, store)[layer_idx]
                full = torch.cat([old, new[row:row + 1]], dim=2)
                getattr(stream._window, store)[layer_idx] = full[:, :, -self.keep:]
                pad = self.width - old.shape[2]
                rows.append(nn.functional.pad(full, (0, 0, pad, 0)) if pad else full)
            out.append(rows[0] if len(rows) == 1 else torch.cat(rows))
        return out[0], out[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given


def _stacked(streams: list[Code2WavStream]) -> tuple[dict, list[int]]:
    """The streams' state stacked along the batch, and each stream's row in it: the stack they were last pushed in
    when it holds exactly them, else a new one of their own states (a single stream's is its own)."""
    kept = streams[0]._batch
    if kept is not None and kept.size == len(streams) > 1 and all(s._batch is kept for s in streams):
        return kept.states, [s._row for s in streams]
    for stream in streams:
        stream._detach()
    rows = list(range(len(streams)))
    if len(streams) == 1:
        return streams[0]._state, rows
    states = {}
    for m, first in streams[0]._state.items():  # one phase: the same to_drop in every row
        states[m] = _State(torch.cat([s._state[m].tail for s in streams]), first.to_drop)
    batch = _Batch(states, len(streams))
    for row, stream in enumerate(streams):
        stream._batch, stream._row = batch, row
    return states, rows


def _decoder(model: nn.Module, hidden: Tensor, states: dict) -> Tensor:
    """The upsampling and the decoder over the next samples hidden [B, hidden, n] with the streams' (stacked) state:
    the waveform [B, samples] (float32)."""
    for blocks in model.upsample:
        for block in blocks:
            hidden = _step(block, hidden, states)
    for block in model.decoder:
        hidden = _step(block, hidden, states)
    return hidden.clamp(min=-1, max=1)[:, 0].float()


class _FrameDecoder:
    """`_decoder` for one frame per stream, replayed from a trace per batch size (`services.engines.replay`: the same
    ops, without the GIL): `steady` frames trim nothing (`to_drop` 0), a stream's `first` frame trims what every new
    stream's does. Code2Wav's ops are many and small (about 800 a step at the tiny checkpoint's widths), and in process
    the Talker and MTP, on every frame's path, waited for its Python between theirs. A first frame is on the path to
    a turn's first audio: 2.7 ms eagerly and 2.3 ms replayed alone, 7.0 and 4.0 ms beside a thread of eager Code2Wav
    steps (batch 1, tiny; 6 streams: 12.3 and 6.7 ms). The states go in and come back as tensors, so the trace keeps
    none."""

    def __init__(self, model: nn.Module, stateful: list[nn.Module], replay: bool):
        self.model, self.stateful = model, stateful
        self.trims = {m: m.left_pad for m in stateful if isinstance(m, ref.Qwen3OmniMoeCausalTransConvNet)}
        # Each transposed conv trims its first `left_pad` samples; when one frame's output covers them (Code2Wav's
        # k = 2s: left_pad = s), a stream is steady after its first frame, and a first frame has one trace.
        self.first_is_whole = all(pad <= m.conv.stride[0] for m, pad in self.trims.items())
        self.steady = Replays("Code2Wav", self._steady, replay)  # by batch size
        self.first = Replays("Code2Wav", self._first, replay)

    def __call__(self, hidden: Tensor, states: dict, first: bool) -> Tensor:
        replays = self.first if first else self.steady
        wav, *after = replays(int(hidden.shape[0]), hidden, *(states[m].tail for m in self.stateful))
        for m, tail in zip(self.stateful, after, strict=True):
            states[m].tail, states[m].to_drop = tail, 0
        return wav

    def _steady(self, hidden: Tensor, *tails: Tensor) -> tuple[Tensor, ...]:
        return self._run(hidden, tails, {})

    def _first(self, hidden: Tensor, *tails: Tensor) -> tuple[Tensor, ...]:
        return self._run(hidden, tails, self.trims)

    def _run(self, hidden: Tensor, tails: tuple[Tensor, ...], trims: dict) -> tuple[Tensor, ...]:
        """`_decoder` over states made of `tails` (it writes none of them) and `trims` (to_drop): the waveform,
        then the new tails."""
        states = {m: _State(t, trims.get(m, 0)) for m, t in zip(self.stateful, tails, strict=True)}
        wav = _decoder(self.model, hidden, states)
        return (wav, *(states[m].tail for m in self.stateful))


def _stateful(model: nn.Module) -> list[nn.Module]:
    """The modules with streaming state (causal convs and transposed convs), in registration order."""
    return [m for m in model.modules()
            if isinstance(m, (ref.Qwen3OmniMoeCausalConvNet, ref.Qwen3OmniMoeCausalTransConvNet))]


def _step(module: nn.Module, x: Tensor, states: dict) -> Tensor:
    """One reference submodule on the next samples x [B, C, L], with the streams' (stacked) state."""
    if isinstance(module, ref.Qwen3OmniMoeCausalConvNet):
        return _conv(module, x, states)
    if isinstance(module, ref.Qwen3OmniMoeCausalTransConvNet):
        return _trans_conv(module, x, states)
    if isinstance(module, ref.Qwen3OmniMoeSnakeBeta):
        return _snake(module, x)
    if isinstance(module, ref.Qwen3OmniMoeConvNeXtBlock):
        h = _conv(module.dwconv, x, states).permute(0, 2, 1)
        h = module.pwconv2(module.act(module.pwconv1(module.norm(h))))
        return x + (module.gamma * h).permute(0, 2, 1)
    if isinstance(module, ref.Qwen3OmniMoeCode2WavDecoderResidualUnit):
        h = _conv(module.conv1, _snake(module.act1, x), states)
        return x + _conv(module.conv2, _snake(module.act2, h), states)
    if isinstance(module, ref.Qwen3OmniMoeCode2WavDecoderBlock):
        for block in module.block:
            x = _step(block, x, states)
        return x
    raise TypeError(f"no streaming rule for {type(module).__name__}")


def _snake(snake: nn.Module, x: Tensor) -> Tensor:
    """`Qwen3OmniMoeSnakeBeta` bit for bit (x + 1 / (exp(beta) + eps) * sin(x * exp(alpha))^2, its ops in its order),
    in one buffer and with the per-channel factors computed once: it took a third of a tiny Code2Wav's time."""
    params = (snake.alpha._version, snake.beta._version, snake.alpha.dtype, snake.alpha.device)
    kept = _SNAKE_FACTORS.get(snake)
    if kept is None or kept[0] != params:  # new, or its weights were loaded, moved or cast since
        alpha = torch.exp(snake.alpha.unsqueeze(0).unsqueeze(-1))
        beta = torch.exp(snake.beta.unsqueeze(0).unsqueeze(-1))
        kept = _SNAKE_FACTORS[snake] = (params, alpha, 1.0 / (beta + snake.no_div_by_zero))
    _, alpha, inverse = kept
    return (x * alpha).sin_().pow_(2).mul_(inverse).add_(x)


_SNAKE_FACTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # SnakeBeta -> (its params, the factors)


def _conv(conv: nn.Module, x: Tensor, states: dict) -> Tensor:
    state = states[conv]
    keep = state.tail.shape[-1]
    if keep:
        x = torch.cat([state.tail, x], dim=-1)
        state.tail = x[..., -keep:].contiguous()  # a copy, so the chunk itself is not kept alive
    return conv.conv(x)


def _trans_conv(tconv: nn.Module, x: Tensor, states: dict) -> Tensor:
    # One GEMM, then overlap-add: input t adds kernel piece i (k = m*s, pieces of s taps) to output block t + i.
    # (torch's conv_transpose1d takes a slow path, ~10x slower, on the few samples of one frame.)
    state = states[tconv]
    conv = tconv.conv
    c_in, c_out, k = conv.weight.shape
    s = conv.stride[0]
    b, _, n = x.shape
    pieces = (x.transpose(1, 2) @ conv.weight.view(c_in, c_out * k)).view(b, n, c_out, k // s, s)
    pieces = pieces.permute(0, 3, 2, 1, 4).reshape(b, k // s, c_out, n * s)
    y = x.new_zeros(b, c_out, n * s + k - s)
    y[:, :, : k - s] = state.tail
    for i in range(k // s):
        y[:, :, i * s : i * s + n * s] += pieces[:, i]
    done = n * s  # samples no later input can reach
    state.tail = y[:, :, done:].clone()
    out = y[:, :, :done] + conv.bias[:, None]
    drop = min(state.to_drop, done)
    state.to_drop -= drop
    return out[:, :, drop:]


def _held_samples(module: nn.Module) -> int:
    """Output samples each frame holds back for the next: every transposed conv's overlap, times the
    upsampling after it."""
    held = 0
    for m in module.modules():  # registration order is data-flow order: upsample, then decoder blocks
        if isinstance(m, ref.Qwen3OmniMoeCausalTransConvNet):
            k, s = m.conv.kernel_size[0], m.conv.stride[0]
            if k % s or m.left_pad != k - s:
                raise CheckpointError(f"Code2Wav transposed conv with kernel {k}, stride {s}: cannot stream it")
            held = held * s + k - s
    return held
