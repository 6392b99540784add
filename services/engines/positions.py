"""TM-RoPE position ids (time-aligned multimodal RoPE) for a prompt, computed by the reference's own code.

`Qwen3OmniMoePreTrainedModelForConditionalGeneration.get_rope_index` needs no weights: it reads `self.config`
(multimodal token ids, `position_id_per_seconds`, `audio_config.n_window`), `self.spatial_merge_size` and its
sibling method `get_llm_pos_ids_for_vision`. `TMRoPE` holds exactly those and borrows both methods unchanged, so the
reference code runs as is without building (or faking) a model. The reference's Talker does the same: it calls that
function with itself as `self`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoePreTrainedModelForConditionalGeneration as _Reference,
)


@dataclass
class PromptLayout:
    """Where a prompt's tokens sit: its ids and what fixes its media's TM-RoPE positions. The Thinker's and the
    Talker's prompts are both a layout plus their own inputs, so a turn's layout passes from one to the other whole
    (`layout_of`)."""

    input_ids: Tensor  # [L] LongTensor, the processor's expanded prompt
    audio_feature_lengths: Tensor | None = None  # [num_audios] mel frames per audio
    image_grid_thw: Tensor | None = None  # [num_images, 3]
    video_grid_thw: Tensor | None = None  # [num_videos, 3]
    video_second_per_grid: Tensor | None = None  # [num_videos]
    use_audio_in_video: bool = False  # videos carry their audio track (interleaved positions)


def layout_of(prompt: PromptLayout) -> dict:
    """`prompt`'s layout fields, to build another prompt of the same layout: `TalkerPrompt(**layout_of(p), ...)`."""
    return {f.name: getattr(prompt, f.name) for f in fields(PromptLayout)}


@dataclass
class PromptPositions:
    position_ids: Tensor  # [4, 1, L] float: the text position, then the temporal/height/width rotary positions
    rope_delta: int  # rotary position of token i past the prompt = i + rope_delta (0 for text-only prompts)


class TMRoPE:
    get_rope_index = _Reference.get_rope_index
    get_llm_pos_ids_for_vision = _Reference.get_llm_pos_ids_for_vision

    def __init__(self, config, spatial_merge_size: int):
        """`config`: the Thinker config, or any config with its multimodal token ids and `audio_config.n_window`."""
        self.config = config
        self.spatial_merge_size = spatial_merge_size

    def prompt_positions(
        self,
        input_ids: Tensor,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        audio_feature_lengths: Tensor | None = None,
        video_second_per_grid: Tensor | None = None,
        use_audio_in_video: bool = False,
    ) -> PromptPositions:
        """Positions of a whole prompt (input_ids [L]), as the reference's `generate` builds them for prefill."""
        ids = input_ids.view(1, -1).cpu()
        rope_ids, deltas = self.get_rope_index(
            ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=torch.ones_like(ids),
            use_audio_in_video=use_audio_in_video,
            audio_seqlens=audio_feature_lengths,
            second_per_grids=video_second_per_grid,
        )
        text_ids = torch.arange(ids.shape[1], dtype=rope_ids.dtype).view(1, 1, -1)
        return PromptPositions(torch.cat([text_ids, rope_ids.to(text_ids.dtype)]), int(deltas.view(-1)[0]))

    def layout_positions(self, layout: PromptLayout, input_ids: Tensor | None = None) -> PromptPositions:
        """Positions of `layout`'s prompt, or of `input_ids` laid out with its media (the Talker's user positions)."""
        def cpu(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.cpu()

        return self.prompt_positions(
            layout.input_ids if input_ids is None else input_ids,
            image_grid_thw=cpu(layout.image_grid_thw),
            video_grid_thw=cpu(layout.video_grid_thw),
            audio_feature_lengths=cpu(layout.audio_feature_lengths),
            video_second_per_grid=cpu(layout.video_second_per_grid),
            use_audio_in_video=layout.use_audio_in_video,
        )


def step_positions(start: int, length: int, rope_delta: int) -> Tensor:
    """[4, 1, length] positions of `length` tokens appended at text position `start` after a prompt."""
    text = torch.arange(start, start + length, dtype=torch.float32).view(1, 1, -1)
    return torch.cat([text, (text + rope_delta).expand(3, 1, -1)])
