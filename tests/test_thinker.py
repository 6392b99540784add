"""Thinker engine against the reference Thinker: prefill logits, accept-layer hidden states, greedy decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from services.checkpoint.loading import Checkpoint, parameter_bytes
from services.engines.audio_encoder import AudioEncoderEngine
from services.engines.thinker import ThinkerEngine, ThinkerPrompt
from services.engines.vision_encoder import VisionEncoderEngine
from services.errors import InvalidInput, ResourceExhausted

ATOL = 1e-5
NEW_TOKENS = 10
# Keep the processor from upscaling 64x64 frames (its default minimum is 128 * 32 * 32 pixels).
VIDEO_KWARGS = {"size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, "cap_pixels_per_frame": True}


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    ckpt = Checkpoint.open(tiny_ckpt)
    return (
        ThinkerEngine.from_checkpoint(ckpt),
        AudioEncoderEngine.from_checkpoint(ckpt),
        VisionEncoderEngine.from_checkpoint(ckpt),
    )


def processor_inputs(processor, parts: list[str]) -> dict:
    """One user turn holding `parts` (audio / image / video) and a question, through the real processor."""
    rng = np.random.default_rng(0)
    content, media = [], {"audio": [], "images": [], "videos": []}
    for part in parts:
        content.append({"type": part, part: "synthetic"})
        if part == "audio":
            t = np.arange(24000) / 16000  # 1.5 s chirp + noise
            wave = 0.5 * np.sin(2 * np.pi * (200 + 800 * t) * t) + 0.05 * rng.standard_normal(t.size)
            media["audio"].append(wave.astype(np.float32))
        elif part == "image":
            media["images"].append(Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)))
        else:
            media["videos"].append(rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8))
    content.append({"type": "text", "text": "What do you perceive?"})
    messages = [{"role": "user", "content": content}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    media = {k: v for k, v in media.items() if v}
    return dict(processor(text=text, return_tensors="pt", videos_kwargs=VIDEO_KWARGS, **media))


def thinker_prompt(inputs: dict, audio_engine, vision_engine) -> ThinkerPrompt:
    """What the conductor does: run the encoder engines, hand their outputs to the Thinker."""
    prompt = ThinkerPrompt(input_ids=inputs["input_ids"][0])
    if "input_features" in inputs:
        prompt.audio_embeds = audio_engine.encode(inputs["input_features"], inputs["feature_attention_mask"])
        prompt.audio_feature_lengths = inputs["feature_attention_mask"].sum(-1)
    if "pixel_values" in inputs:
        prompt.image = vision_engine.encode(inputs["pixel_values"], inputs["image_grid_thw"])
        prompt.image_grid_thw = inputs["image_grid_thw"]
    if "pixel_values_videos" in inputs:
        prompt.video = vision_engine.encode(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        prompt.video_grid_thw = inputs["video_grid_thw"]
        prompt.video_second_per_grid = inputs["video_second_per_grid"]
    return prompt


@pytest.mark.parametrize(
    "parts",
    [[], ["audio"], ["image"], ["audio", "image"], ["video"], ["image", "video"]],
    ids=lambda parts: "+".join(parts) or "text",
)
def test_matches_reference(parts, engines, reference, processor):
    thinker, audio_engine, vision_engine = engines
    inputs = processor_inputs(processor, parts)
    ids = inputs["input_ids"][0]
    with torch.inference_mode():
        forward = reference.thinker(**inputs, output_hidden_states=True)
        generated = reference.thinker.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    want_ids = generated.sequences[0, len(ids):].tolist()
    assert len(want_ids) == NEW_TOKENS  # random weights: no early EOS, every step is compared

    session, prefill = thinker.prefill(thinker_prompt(inputs, audio_engine, vision_engine), max_new_tokens=NEW_TOKENS)
    # TM-RoPE: the reference's rotary offset, which only vision moves (2-D grids shrink it, video time stretches it).
    assert session.rope_delta == int(reference.thinker.model.rope_deltas)
    assert (session.rope_delta != 0) == any(p in ("image", "video") for p in parts)

    torch.testing.assert_close(prefill.logits, forward.logits[0, -1], atol=ATOL, rtol=0)
    tc = reference.config.thinker_config
    mm_mask = torch.isin(ids, torch.tensor([tc.audio_token_id, tc.image_token_id, tc.video_token_id]))
    accept = forward.hidden_states[thinker.accept_hidden_layer][0]
    assert prefill.mm_hidden.shape == (int(mm_mask.sum()), 64)
    torch.testing.assert_close(prefill.mm_hidden, accept[mm_mask], atol=ATOL, rtol=0)

    logits, got_ids = prefill.logits, []
    for step in range(NEW_TOKENS):
        torch.testing.assert_close(logits, generated.logits[step][0], atol=ATOL, rtol=0)
        got_ids.append(int(logits.argmax()))
        if step + 1 < NEW_TOKENS:
            logits = thinker.decode(session, got_ids[-1])
    assert got_ids == want_ids
    session.close()


def test_loads_only_its_tensors(tiny_ckpt_sharded, reference):
    ckpt = Checkpoint.open(tiny_ckpt_sharded)
    engine = ThinkerEngine.from_checkpoint(ckpt)
    prefixes = ("thinker.model.", "thinker.lm_head.")
    assert all(name.startswith(prefixes) for name in ckpt.read_log)
    assert sorted(ckpt.read_log) == sorted(ckpt.names(prefixes[0]) + ckpt.names(prefixes[1]))
    assert engine.parameter_bytes == parameter_bytes(reference.thinker.model.language_model, reference.thinker.lm_head)
    assert engine.accept_hidden_layer == ckpt.config.talker_config.accept_hidden_layer


def test_rejects_bad_prompts(engines, processor, reference):
    thinker, audio_engine, vision_engine = engines
    inputs = processor_inputs(processor, ["audio", "image"])
    prompt = thinker_prompt(inputs, audio_engine, vision_engine)
    ids = prompt.input_ids
    first_audio_pad = int((ids == reference.config.thinker_config.audio_token_id).nonzero()[0])

    one_pad_less = torch.cat([ids[:first_audio_pad], ids[first_audio_pad + 1:]])
    short = ThinkerPrompt(**{**vars(prompt), "input_ids": one_pad_less})
    with pytest.raises(InvalidInput, match="audio: the prompt has 19 placeholder tokens but 20 embeddings"):
        thinker.prefill(short)
    with pytest.raises(InvalidInput, match="image: the prompt has 6 placeholder tokens but 0 embeddings"):
        thinker.prefill(ThinkerPrompt(**{**vars(prompt), "image": None}))
    with pytest.raises(InvalidInput, match="audio_feature_lengths is required"):
        thinker.prefill(ThinkerPrompt(**{**vars(prompt), "audio_feature_lengths": None}))
    with pytest.raises(InvalidInput, match="image_grid_thw describes 12 tokens, the prompt has 6"):
        thinker.prefill(ThinkerPrompt(**{**vars(prompt), "image_grid_thw": torch.tensor([[1, 8, 6]])}))

    out_of_vocab = ids.clone()
    out_of_vocab[1] = 152064
    with pytest.raises(InvalidInput, match="token id 152064 is outside the Thinker vocabulary"):
        thinker.prefill(ThinkerPrompt(**{**vars(prompt), "input_ids": out_of_vocab}))
    with pytest.raises(InvalidInput, match="token id -1"):
        thinker.prefill(ThinkerPrompt(input_ids=torch.tensor([151644, -1])))


def test_session_limits(engines):
    thinker = engines[0]
    prompt = ThinkerPrompt(input_ids=torch.tensor([151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]))
    session, _ = thinker.prefill(prompt, max_new_tokens=2)
    with pytest.raises(InvalidInput, match="outside the Thinker vocabulary"):
        thinker.decode(session, 10**6)
    thinker.decode(session, 9707)
    thinker.decode(session, 1879)
    with pytest.raises(ResourceExhausted, match="session is full"):
        thinker.decode(session, 11)
    session.close()
    with pytest.raises(InvalidInput, match="closed"):
        thinker.decode(session, 11)
    with pytest.raises(ResourceExhausted, match="exceeds the Thinker's limit"):
        thinker.prefill(prompt, max_new_tokens=thinker.max_seq_len)
