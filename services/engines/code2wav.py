"""Code2Wav engine: frames of 16 codec codes in, 24 kHz waveform out, whole or incrementally.

The math is transformers' `Qwen3OmniMoeCode2Wav`, loaded from `code2wav.*` only. `decode` is its full forward.
`stream()` runs the same submodules frame by frame with explicit per-layer state (Moshi's StreamingModule idea),
and the concatenation of everything a stream returns equals `decode` of all its frames, in any chunking:

- pre-transformer: causal sliding-window attention over `sliding_window` (72) frames. The state is transformers'
  own `DynamicCache` of sliding layers: the last 71 keys/values per layer (RoPE already applied) plus the frame
  count, from which the pre-transformer takes the absolute RoPE positions and the window mask.
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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import DynamicCache
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as ref

from services.checkpoint.loading import Checkpoint, load_pretrained_part, parameter_bytes
from services.config import EngineConfig
from services.errors import CheckpointError, InvalidInput

PREFIX = "code2wav."
SAMPLE_RATE = 24_000  # Code2Wav's output rate; not in its config
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class Code2WavEngine:
    def __init__(self, module: nn.Module, config: EngineConfig = EngineConfig()):
        """module: a `Qwen3OmniMoeCode2Wav` (loaded, or with random weights for benchmarks)."""
        self.model = module.to(device=config.device, dtype=config.torch_dtype).eval()
        self.config = config
        c = module.config
        self.sample_rate = SAMPLE_RATE
        self.samples_per_frame = int(module.total_upsample)
        self.num_quantizers: int = c.num_quantizers
        self.codebook_size: int = c.codebook_size
        self.held_samples = _held_samples(module)
        self.parameter_bytes = parameter_bytes(module)

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
class _ConvState:
    context: Tensor  # [1, C_in, kernel - 1]: the last inputs, which the full forward's left padding starts as


@dataclass
class _TransConvState:
    overlap: Tensor  # [C_out, k - s]: partial outputs that the next input completes (bias not yet added)
    to_drop: int  # how many of the first output samples the full forward still trims


class Code2WavStream:
    """One utterance's incremental decode. State is bounded: per layer a sliding KV window, per conv its kernel
    context, per transposed conv its overlap, so a frame costs the same at frame 10 and at frame 10,000."""

    def __init__(self, engine: Code2WavEngine):
        self.engine = engine
        self.model = engine.model
        self.frames = 0
        self.samples = 0
        self.finished = False
        self._kv = DynamicCache(config=self.model.config)  # sliding layers: keeps the last window - 1 entries
        like = self.model.code_embedding.weight
        self._state: dict[nn.Module, _ConvState | _TransConvState] = {}
        for m in self.model.modules():
            if isinstance(m, ref.Qwen3OmniMoeCausalConvNet):
                self._state[m] = _ConvState(like.new_zeros(1, m.conv.in_channels, m.kernel_size - 1))
            elif isinstance(m, ref.Qwen3OmniMoeCausalTransConvNet):
                pending = m.conv.kernel_size[0] - m.conv.stride[0]
                self._state[m] = _TransConvState(like.new_zeros(m.conv.out_channels, pending), m.left_pad)

    @torch.inference_mode()
    def push(self, codes: Tensor) -> Tensor:
        """codes: [n, num_quantizers] -> every waveform sample [k] that these frames make final (float32)."""
        if self.finished:
            raise InvalidInput("this Code2Wav stream is finished; start a new one")
        codes = self.engine.check_codes(codes)
        if codes.shape[0] == 0:
            return self.engine._empty()
        m = self.model
        hidden = m.code_embedding(codes.T[None] + m.code_offset).mean(1)  # [1, n, hidden]
        hidden = m.pre_transformer(inputs_embeds=hidden, past_key_values=self._kv, use_cache=True).last_hidden_state
        hidden = hidden.permute(0, 2, 1)  # [1, hidden, n]
        for blocks in m.upsample:
            for block in blocks:
                hidden = self._step(block, hidden)
        for block in m.decoder:
            hidden = self._step(block, hidden)
        wav = hidden.clamp(min=-1, max=1)[0, 0].float()
        self.frames += codes.shape[0]
        self.samples += wav.shape[0]
        return wav

    def finish(self) -> Tensor:
        """End of the utterance: the full forward trims the held-back tails, so nothing is left to emit."""
        self.finished = True
        self._kv, self._state = None, {}
        return self.engine._empty()

    def _step(self, module: nn.Module, x: Tensor) -> Tensor:
        """One reference submodule on the next samples x [1, C, L], with this stream's state."""
        if isinstance(module, ref.Qwen3OmniMoeCausalConvNet):
            return self._conv(module, x)
        if isinstance(module, ref.Qwen3OmniMoeCausalTransConvNet):
            return self._trans_conv(module, x)
        if isinstance(module, ref.Qwen3OmniMoeSnakeBeta):
            return module(x)
        if isinstance(module, ref.Qwen3OmniMoeConvNeXtBlock):
            h = self._conv(module.dwconv, x).permute(0, 2, 1)
            h = module.pwconv2(module.act(module.pwconv1(module.norm(h))))
            return x + (module.gamma * h).permute(0, 2, 1)
        if isinstance(module, ref.Qwen3OmniMoeCode2WavDecoderResidualUnit):
            h = self._conv(module.conv1, module.act1(x))
            return x + self._conv(module.conv2, module.act2(h))
        if isinstance(module, ref.Qwen3OmniMoeCode2WavDecoderBlock):
            for block in module.block:
                x = self._step(block, x)
            return x
        raise TypeError(f"no streaming rule for {type(module).__name__}")

    def _conv(self, conv: nn.Module, x: Tensor) -> Tensor:
        state = self._state[conv]
        keep = state.context.shape[-1]
        if keep:
            x = torch.cat([state.context, x], dim=-1)
            state.context = x[..., -keep:].contiguous()  # a copy, so the chunk itself is not kept alive
        return conv.conv(x)

    def _trans_conv(self, tconv: nn.Module, x: Tensor) -> Tensor:
        # One GEMM, then overlap-add: input t adds kernel piece i (k = m*s, pieces of s taps) to output block t + i.
        # (torch's conv_transpose1d takes a slow path, ~10x slower, on the few samples of one frame.)
        state = self._state[tconv]
        conv = tconv.conv
        c_in, c_out, k = conv.weight.shape
        s = conv.stride[0]
        n = x.shape[-1]
        pieces = (x[0].T @ conv.weight.view(c_in, c_out * k)).view(n, c_out, k // s, s)
        pieces = pieces.permute(2, 1, 0, 3).reshape(k // s, c_out, n * s)
        y = x.new_zeros(c_out, n * s + k - s)
        y[:, : k - s] = state.overlap
        for i in range(k // s):
            y[:, i * s : i * s + n * s] += pieces[i]
        done = n * s  # samples no later input can reach
        state.overlap = y[:, done:].clone()
        out = y[:, :done] + conv.bias[:, None]
        drop = min(state.to_drop, done)
        state.to_drop -= drop
        return out[None, :, drop:]


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
