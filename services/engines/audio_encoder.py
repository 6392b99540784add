"""Audio encoder (AuT) engine: log-mel features in, one Thinker-width embedding per 80 ms out.

The math is transformers' `Qwen3OmniMoeAudioEncoder`, loaded from `thinker.audio_tower.*` only; this module adds
input validation and the unpadding `Qwen3OmniMoeThinkerModel.get_audio_features` does before calling the tower.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeAudioEncoder

from services.checkpoint.loading import Checkpoint, load_pretrained_part, parameter_bytes
from services.config import EngineConfig
from services.errors import InvalidInput

PREFIX = "thinker.audio_tower."


class AudioEncoderEngine:
    def __init__(self, tower: torch.nn.Module, config: EngineConfig):
        self.tower = tower
        self.config = config
        self.num_mel_bins: int = tower.config.num_mel_bins
        self.parameter_bytes = parameter_bytes(tower)

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint | str | Path, config: EngineConfig = EngineConfig()
    ) -> "AudioEncoderEngine":
        ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)
        tower = load_pretrained_part(
            Qwen3OmniMoeAudioEncoder, ckpt.config.thinker_config.audio_config, ckpt.read(PREFIX),
            config.device, config.torch_dtype,
        )
        return cls(tower, config)

    @torch.inference_mode()
    def encode(self, input_features: Tensor, feature_attention_mask: Tensor) -> Tensor:
        """input_features: [A, mel, T_max], feature_attention_mask: [A, T_max] -> [sum of output_lengths, D]."""
        self._validate(input_features, feature_attention_mask)
        mask = feature_attention_mask.to(self.config.device).bool()
        lengths = mask.sum(-1)
        # [A, mel, T_max] -> [mel, sum(T)]: the tower takes all audios back to back, without padding.
        features = input_features.to(self.config.device).permute(0, 2, 1)[mask].permute(1, 0)
        out = self.tower(features, feature_lens=lengths)
        return out.last_hidden_state

    def _validate(self, input_features: Tensor, feature_attention_mask: Tensor) -> None:
        if input_features.ndim != 3:
            raise InvalidInput(
                f"audio features must be [num_audios, mel_bins, frames], got shape {tuple(input_features.shape)}"
            )
        num_audios, mel_bins, frames = input_features.shape
        if mel_bins != self.num_mel_bins:
            raise InvalidInput(f"audio features have {mel_bins} mel bins, the audio encoder takes {self.num_mel_bins}")
        if not input_features.is_floating_point():
            raise InvalidInput(f"audio features must be floating point, got {input_features.dtype}")
        if tuple(feature_attention_mask.shape) != (num_audios, frames):
            raise InvalidInput(
                f"feature_attention_mask has shape {tuple(feature_attention_mask.shape)}, "
                f"the features need ({num_audios}, {frames})"
            )
        if num_audios == 0:
            raise InvalidInput("no audio to encode")
        if not ((feature_attention_mask == 0) | (feature_attention_mask == 1)).all():
            raise InvalidInput("feature_attention_mask must hold only 0 and 1")
        if (feature_attention_mask.sum(-1) == 0).any():
            raise InvalidInput("an audio has no frames (its feature_attention_mask is all zeros)")
