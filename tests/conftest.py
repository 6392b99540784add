"""Shared fixtures: one tiny checkpoint (single file and sharded) and the transformers reference model per run."""

from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The local API key that deployed tests' clusters and clients share (services.auth), not the user's own.
os.environ.setdefault("OMNI_CONFIG_DIR", tempfile.mkdtemp(prefix="omni-config-"))
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from services.checkpoint.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_ckpt_sharded(tmp_path_factory):
    from services.checkpoint.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_sharded") / "ckpt", seed=0, max_shard_size="20MB")


@pytest.fixture(scope="session")
def tiny_thinking(tmp_path_factory):
    """The tiny Thinking checkpoint: the Thinker alone, a chat template that renders reasoning."""
    from services.checkpoint.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_thinking") / "ckpt", seed=0, variant="thinking")


@pytest.fixture(scope="session")
def tiny_captioner(tmp_path_factory):
    """The tiny Captioner checkpoint, written by `omni checkpoint tiny --variant captioner` (a directory whose name
    says nothing: the config's `_name_or_path` does)."""
    from services.cli import main as omni

    out = tmp_path_factory.mktemp("tiny_captioner") / "ckpt"
    assert omni(["checkpoint", "tiny", str(out), "--seed", "1", "--variant", "captioner"]) == 0
    return out


@pytest.fixture(scope="session")
def reference_thinking(tiny_thinking):
    """The reference model on the tiny Thinking checkpoint (no Talker: `generate` answers text only)."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    return Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_thinking, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def reference(tiny_ckpt):
    """`Qwen3OmniMoeForConditionalGeneration` on the tiny checkpoint: the definition of correct."""
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_ckpt, dtype=torch.float32).eval()
    # Known reference bug (DESIGN.md section 4): the Talker's TM-RoPE reads audio_config.n_window from its own
    # config, which has none. Patch the reference only; our Talker must not need this.
    model.talker.config.audio_config = model.config.thinker_config.audio_config
    return model


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """Small test inputs on disk: a 1.3 s chirp WAV (16 kHz), a 64x96 noise PNG, a 2-frame video directory."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("media")
    t = np.arange(int(1.3 * 16000)) / 16000
    sf.write(d / "chirp.wav", (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32), 16000)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(d / "noise.png")
    (d / "video").mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(d / "video" / f"{i:03d}.png")
    return {"audio": str(d / "chirp.wav"), "image": str(d / "noise.png"), "video": str(d / "video"), "dir": d}


@pytest.fixture(scope="session")
def processor(tiny_ckpt):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_ckpt)
