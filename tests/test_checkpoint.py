"""The tiny checkpoint is a real Qwen3-Omni checkpoint: transformers loads and runs it, the processor works, the
tokenizer has the real vocabulary and special ids, seeds are reproducible, sharding writes an index. Broken
checkpoint directories give a clear CheckpointError."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from services.checkpoint.loading import Checkpoint
from services.cli import main as omni
from services.errors import CheckpointError


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reference_loads_and_generates_speech(reference, processor):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello world, this is Qwen."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=text, return_tensors="pt")
    seq, wav = reference.generate(**inputs, thinker_max_new_tokens=4, talker_max_new_tokens=6,
                                  thinker_do_sample=False, talker_do_sample=False)
    assert seq.shape[1] > inputs["input_ids"].shape[1]
    assert wav.numel() > 0 and torch.isfinite(wav).all()


def test_tokenizer_is_the_real_qwen_vocabulary(processor, reference):
    tok = processor.tokenizer
    assert tok("Hello world, this is Qwen.").input_ids == [9707, 1879, 11, 419, 374, 1207, 16948, 13]
    cfg = reference.config
    expected = {
        "<|endoftext|>": 151643, "<|im_start|>": cfg.im_start_token_id, "<|im_end|>": cfg.im_end_token_id,
        "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": cfg.thinker_config.image_token_id,
        "<|video_pad|>": cfg.thinker_config.video_token_id, "<|audio_start|>": 151669, "<|audio_end|>": 151670,
        "<tts_pad>": cfg.tts_pad_token_id, "<tts_text_bos>": cfg.tts_bos_token_id,
        "<tts_text_eod>": cfg.tts_eos_token_id, "<|audio_pad|>": cfg.thinker_config.audio_token_id,
    }
    assert {t: tok.convert_tokens_to_ids(t) for t in expected} == expected
    assert tok("system").input_ids == [cfg.system_token_id]
    assert tok("user").input_ids == [cfg.user_token_id]
    assert tok("assistant").input_ids == [cfg.assistant_token_id]


def test_chat_template_layout(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "image", "image": "b.png"},
                                     {"type": "text", "text": "What is this?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_processor_handles_text_audio_and_images(processor):
    messages = [{"role": "user", "content": [{"type": "audio", "audio": "x"}, {"type": "image", "image": "y"},
                                             {"type": "text", "text": "Describe."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    audio = np.sin(np.linspace(0, 2000, 16000)).astype(np.float32)  # 1 s at 16 kHz
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    out = processor(text=text, audio=[audio], images=[image], return_tensors="pt")
    assert out["input_features"].shape[1] == 128
    ids = out["input_ids"][0]
    n_audio = int((ids == processor.audio_token_id).sum())
    n_image = int((ids == processor.image_token_id).sum())
    assert n_audio == 13  # 100 mel frames per second -> 13 tokens at 12.5 Hz
    assert n_image == int(out["image_grid_thw"].prod()) // 4


def test_same_seed_is_byte_identical_and_seed_matters(tmp_path, tiny_ckpt):
    assert omni(["checkpoint", "tiny", str(tmp_path / "again"), "--seed", "0"]) == 0
    assert _digest(tmp_path / "again" / "model.safetensors") == _digest(tiny_ckpt / "model.safetensors")
    assert omni(["checkpoint", "tiny", str(tmp_path / "other"), "--seed", "1"]) == 0
    assert _digest(tmp_path / "other" / "model.safetensors") != _digest(tiny_ckpt / "model.safetensors")


def test_sharded_checkpoint_has_a_proper_index(tiny_ckpt, tiny_ckpt_sharded):
    index = json.loads((tiny_ckpt_sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((tiny_ckpt_sharded / f).is_file() for f in files)
    single = Checkpoint.open(tiny_ckpt)
    sharded = Checkpoint.open(tiny_ckpt_sharded)
    assert set(single.weight_map) == set(sharded.weight_map)
    name = "code2wav.code_embedding.weight"
    assert torch.equal(single.read_one(name), sharded.read_one(name))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config_is_a_clear_error(tmp_path, tiny_ckpt):
    broken = _copy(tiny_ckpt, tmp_path / "ck")
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(broken)


def test_config_from_another_model_is_a_clear_error(tmp_path, tiny_ckpt):
    broken = _copy(tiny_ckpt, tmp_path / "ck")
    (broken / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="'llama' config, not Qwen3-Omni"):
        Checkpoint.open(broken)


def test_missing_weights_are_a_clear_error(tmp_path, tiny_ckpt, tiny_ckpt_sharded):
    no_weights = _copy(tiny_ckpt, tmp_path / "single")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        Checkpoint.open(no_weights)
    sharded = _copy(tiny_ckpt_sharded, tmp_path / "sharded")
    victim = sorted(sharded.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing weight shards .*{victim.name}"):
        Checkpoint.open(sharded)


def test_missing_directory_via_cli_is_one_line_and_nonzero(tmp_path, capsys):
    code = omni(["generate", "--model", str(tmp_path / "nope"), "--text", "hi", "--output", str(tmp_path / "a.wav")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "does not exist" in err[0]
