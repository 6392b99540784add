"""Audio and vision encoder engines against the reference's `get_audio_features` / `get_image_features`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from services.checkpoint.loading import Checkpoint, parameter_bytes
from services.engines.audio_encoder import AudioEncoderEngine
from services.engines.vision_encoder import VisionEncoderEngine
from services.errors import InvalidInput

ATOL = 1e-5


def chirp(seconds: float, seed: int) -> np.ndarray:
    """16 kHz float32 chirp plus noise: deterministic audio with content across the mel bins."""
    t = np.arange(int(seconds * 16000)) / 16000
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.5 * np.sin(2 * np.pi * (200 + 800 * t) * t) + 0.05 * noise).astype(np.float32)


def random_image(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return Checkpoint.open(tiny_ckpt)


@pytest.fixture(scope="module")
def audio_engine(ckpt):
    return AudioEncoderEngine.from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def vision_engine(ckpt):
    return VisionEncoderEngine.from_checkpoint(ckpt)


def test_audio_matches_reference(audio_engine, reference, processor):
    # Two audios of different lengths: the engine must unpad and concatenate them in order, like the reference.
    features = processor.feature_extractor(
        [chirp(1.0, 0), chirp(1.7, 1)], sampling_rate=16000, padding=True, truncation=False,
        return_attention_mask=True, return_tensors="pt",
    )
    feats, mask = features["input_features"], features["attention_mask"]
    got = audio_engine.encode(feats, mask)
    with torch.inference_mode():
        want = reference.thinker.get_audio_features(feats, feature_attention_mask=mask).last_hidden_state
    assert got.shape == want.shape == (13 + 22, 64)  # 100 and 170 mel frames
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_image_matches_reference(vision_engine, reference, processor):
    out = processor.image_processor([random_image(64, 96, 0), random_image(96, 64, 1)], return_tensors="pt")
    got = vision_engine.encode(out["pixel_values"], out["image_grid_thw"])
    with torch.inference_mode():
        want = reference.thinker.get_image_features(out["pixel_values"], out["image_grid_thw"])
    torch.testing.assert_close(got.embeds, torch.cat(want.pooler_output), atol=ATOL, rtol=0)
    assert len(got.deepstack) == len(want.deepstack_features) == 2
    for g, w in zip(got.deepstack, want.deepstack_features):
        torch.testing.assert_close(g, torch.cat(w), atol=ATOL, rtol=0)


def test_video_matches_reference(vision_engine, reference, processor):
    frames = np.random.default_rng(2).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    out = processor.video_processor([frames], return_tensors="pt")
    pixels, grid = out["pixel_values_videos"], out["video_grid_thw"]
    assert int(grid[0, 0]) > 1  # several temporal patches
    got = vision_engine.encode(pixels, grid)
    with torch.inference_mode():
        want = reference.thinker.get_video_features(pixels, grid)
    torch.testing.assert_close(got.embeds, torch.cat(want.pooler_output), atol=ATOL, rtol=0)
    for g, w in zip(got.deepstack, want.deepstack_features, strict=True):
        torch.testing.assert_close(g, torch.cat(w), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "engine_cls, prefix, reference_module",
    [
        (AudioEncoderEngine, "thinker.audio_tower.", "audio_tower"),
        (VisionEncoderEngine, "thinker.visual.", "visual"),
    ],
)
def test_loads_only_its_tensors(engine_cls, prefix, reference_module, tiny_ckpt_sharded, reference):
    ckpt = Checkpoint.open(tiny_ckpt_sharded)
    engine = engine_cls.from_checkpoint(ckpt)
    assert ckpt.read_log and all(name.startswith(prefix) for name in ckpt.read_log)
    assert sorted(ckpt.read_log) == sorted(ckpt.names(prefix))
    assert engine.parameter_bytes == parameter_bytes(getattr(reference.thinker.model, reference_module))


def test_audio_rejects_bad_input(audio_engine):
    feats, mask = torch.zeros(1, 128, 100), torch.ones(1, 100, dtype=torch.long)
    with pytest.raises(InvalidInput, match="80 mel bins.*takes 128"):
        audio_engine.encode(torch.zeros(1, 80, 100), mask)
    with pytest.raises(InvalidInput, match="feature_attention_mask has shape"):
        audio_engine.encode(feats, mask[:, :50])
    with pytest.raises(InvalidInput, match="no frames"):
        audio_engine.encode(feats, torch.zeros_like(mask))
    with pytest.raises(InvalidInput, match=r"\[num_audios, mel_bins, frames\]"):
        audio_engine.encode(feats[0], mask)


def test_vision_rejects_bad_input(vision_engine):
    grid = torch.tensor([[1, 4, 6]])
    with pytest.raises(InvalidInput, match="holds 23 patches, grid_thw describes 24"):
        vision_engine.encode(torch.zeros(23, 1536), grid)
    with pytest.raises(InvalidInput, match=r"pixel_values must be \[num_patches, 1536\]"):
        vision_engine.encode(torch.zeros(24, 768), grid)
    with pytest.raises(InvalidInput, match="multiples of the merge size"):
        vision_engine.encode(torch.zeros(20, 1536), torch.tensor([[1, 4, 5]]))
    with pytest.raises(InvalidInput, match="grid_thw must be"):
        vision_engine.encode(torch.zeros(24, 1536), grid[0])
