"""Vision encoder engine: image / video-frame patches in, merged patch embeddings and deepstack features out.

The math is transformers' `Qwen3OmniMoeVisionEncoder`, loaded from `thinker.visual.*` only. Images and videos
share it: a video is a grid with t > 1 (two frames per temporal patch), exactly as the processor lays it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

from services.checkpoint.loading import Checkpoint, load_pretrained_part, parameter_bytes
from services.config import EngineConfig
from services.errors import InvalidInput

PREFIX = "thinker.visual."


@dataclass
class VisionEmbeddings:
    embeds: Tensor  # [N_tokens, D] merged patch embeddings, all images (or videos) back to back
    deepstack: list[Tensor]  # one [N_tokens, D] per deepstack layer, added to the Thinker's first layers


class VisionEncoderEngine:
    def __init__(self, visual: torch.nn.Module, config: EngineConfig):
        self.visual = visual
        self.config = config
        vc = visual.config
        self.patch_dim: int = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        self.spatial_merge_size: int = vc.spatial_merge_size
        self.parameter_bytes = parameter_bytes(visual)

    @classmethod
    def from_checkpoint(
        cls, ckpt: Checkpoint | str | Path, config: EngineConfig = EngineConfig()
    ) -> "VisionEncoderEngine":
        ckpt = ckpt if isinstance(ckpt, Checkpoint) else Checkpoint.open(ckpt)
        visual = load_pretrained_part(
            Qwen3OmniMoeVisionEncoder, ckpt.config.thinker_config.vision_config, ckpt.read(PREFIX),
            config.device, config.torch_dtype,
        )
        return cls(visual, config)

    @torch.inference_mode()
    def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> VisionEmbeddings:
        """pixel_values: [sum(t*h*w), C*tp*p*p], grid_thw: [num_items, 3] -> sum(t*h*w) / merge^2 tokens."""
        self._validate(pixel_values, grid_thw)
        out = self.visual(
            pixel_values.to(self.config.device, self.config.torch_dtype), grid_thw=grid_thw.to(self.config.device)
        )
        return VisionEmbeddings(embeds=out.pooler_output, deepstack=list(out.deepstack_features))

    def _validate(self, pixel_values: Tensor, grid_thw: Tensor) -> None:
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
            raise InvalidInput(f"grid_thw must be [num_items, 3], got shape {tuple(grid_thw.shape)}")
        if grid_thw.is_floating_point() or (grid_thw <= 0).any():
            raise InvalidInput(f"grid_thw must hold positive integers, got {grid_thw.tolist()}")
        m = self.spatial_merge_size
        if ((grid_thw[:, 1:] % m) != 0).any():
            raise InvalidInput(
                f"grid heights and widths must be multiples of the merge size {m}, got {grid_thw.tolist()}"
            )
        if pixel_values.ndim != 2 or pixel_values.shape[1] != self.patch_dim:
            raise InvalidInput(
                f"pixel_values must be [num_patches, {self.patch_dim}], got shape {tuple(pixel_values.shape)}"
            )
        patches = int(grid_thw.prod(-1).sum())
        if pixel_values.shape[0] != patches:
            raise InvalidInput(f"pixel_values holds {pixel_values.shape[0]} patches, grid_thw describes {patches}")
