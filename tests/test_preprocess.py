"""Preprocessing: decoding and validation of user media and chat JSON, and the processor outputs of a turn."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from services.errors import InvalidInput, ResourceExhausted
from services.preprocess import (
    AudioInput,
    build_turn,
    decode_audio,
    load_audio,
    load_image,
    load_video,
    validate_conversation,
)
from services.turn_parts import audio_part, image_part, text_part, video_part

AUDIO_PAD, IMAGE_PAD, VIDEO_PAD = 151675, 151655, 151656
VISION_START, AUDIO_START = 151652, 151669


def sine(rate: int, seconds: float, freq: float = 440.0, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def wav_bytes(x: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


def image_bytes(size=(64, 48), mode="RGB", fmt="PNG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format=fmt)
    return buf.getvalue()


def frames(n: int, size=(32, 32)) -> list[Image.Image]:
    return [Image.open(io.BytesIO(image_bytes(size, seed=i))) for i in range(n)]


def audio_tokens(num_samples: int) -> int:
    """Qwen3-Omni's audio length: mel frames (10 ms hop), 13 tokens per full 100-frame window, then 3 stride-2
    convolutions on the rest (`_get_feat_extract_output_lengths`, n_window 50)."""
    mel = num_samples // 160
    rest = (mel % 100 - 1) // 2 + 1
    return ((rest - 1) // 2 + 1 - 1) // 2 + 1 + (mel // 100) * 13


def count(outputs: dict, token_id: int) -> int:
    return int((outputs["input_ids"] == token_id).sum())


# ---- audio ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate, channels, subtype", [
    (8000, 1, "PCM_16"), (16000, 1, "FLOAT"), (22050, 1, "PCM_16"), (44100, 2, "PCM_16"), (48000, 2, "FLOAT"),
    (48000, 1, "PCM_16"),
])
def test_wav_is_resampled_to_16k_keeping_frequency(tmp_path, rate, channels, subtype):
    x = sine(rate, 0.75, freq=440.0, channels=channels)
    path = tmp_path / "a.wav"
    sf.write(path, x, rate, subtype=subtype)
    for source in (path, str(path), path.read_bytes()):
        audio = decode_audio(source)
        assert audio.source_rate == rate and audio.samples.dtype == np.float32 and audio.samples.ndim == 1
        assert abs(len(audio.samples) - len(x) * 16000 / rate) <= 1
    spectrum = np.abs(np.fft.rfft(audio.samples * np.hanning(len(audio.samples))))
    peak_hz = np.argmax(spectrum) * 16000 / len(audio.samples)
    assert abs(peak_hz - 440.0) < 2 * 16000 / len(audio.samples)
    # int16 is scaled to [-1, 1) and identical stereo channels average to the same amplitude.
    middle = audio.samples[len(audio.samples) // 4: -len(audio.samples) // 4]
    assert np.abs(middle).max() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64, np.int32])
def test_raw_pcm_needs_its_rate_and_is_scaled(dtype):
    x = sine(8000, 0.5, channels=2)
    scale = {np.int16: 32768, np.int32: 2**31}.get(dtype, 1)
    pcm = (x * scale).astype(dtype)
    samples = load_audio(pcm, 8000)
    assert len(samples) == 8000 and samples.dtype == np.float32
    assert np.abs(samples[2000:6000]).max() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(InvalidInput, match="needs its sample rate"):
        load_audio(pcm)


def test_audio_is_not_resampled_at_16k():
    x = sine(16000, 0.5)
    np.testing.assert_array_equal(load_audio(x, 16000), x)


@pytest.mark.parametrize("data, rate, error, message", [
    (np.zeros(0, np.float32), 16000, InvalidInput, "audio is empty"),
    (wav_bytes(np.zeros(0, np.float32), 16000), None, InvalidInput, "audio is empty"),
    (np.random.default_rng(0).bytes(4000), None, InvalidInput, "cannot decode audio"),
    (b"RIFF\x00\x00\x00\x00WAVEfmt ", None, InvalidInput, "cannot decode audio"),
    (np.zeros(16000, np.float32), 0, InvalidInput, "sample rate 0 Hz"),
    (np.zeros(16000, np.float32), -16000, InvalidInput, "sample rate -16000 Hz"),
    (np.zeros(16000, np.float32), 1_000_000, InvalidInput, "sample rate 1000000 Hz"),
    (np.zeros(16000, np.float32), 16000.5, InvalidInput, "sample rate must be an integer"),
    (np.array([0.0, np.nan] * 1000, np.float32), 16000, InvalidInput, "NaN or infinite"),
    (np.array([0.0, np.inf] * 1000, np.float32), 16000, InvalidInput, "NaN or infinite"),
    (np.zeros(100, np.float32), 16000, InvalidInput, "too short"),
    (np.zeros(16000, np.uint8), 16000, InvalidInput, "dtype must be"),
    (np.zeros((2, 16000), np.float32), 16000, InvalidInput, r"\[samples, channels\]"),
    (np.zeros((4, 4, 4), np.float32), 16000, InvalidInput, "shape"),
    (wav_bytes(sine(8000, 0.5), 8000), 16000, InvalidInput, "file says 8000"),
    ("/nonexistent/a.wav", None, InvalidInput, "not found"),
    (12, None, InvalidInput, "got int"),
])
def test_bad_audio(data, rate, error, message):
    with pytest.raises(error, match=message):
        load_audio(data, rate)


def test_audio_over_the_limit_names_it():
    with pytest.raises(ResourceExhausted, match="2.0 s long, the limit is 1.5 s"):
        load_audio(np.zeros(32000, np.float32), 16000, max_seconds=1.5)
    with pytest.raises(ResourceExhausted, match="the limit is 1.5 s"):  # from the header, before decoding
        load_audio(wav_bytes(sine(48000, 2.0), 48000), max_seconds=1.5)


# ---- images and video -------------------------------------------------------------------------------------


def test_images_decode_to_rgb(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(image_bytes((40, 30), fmt="JPEG"))
    for source in (image_bytes((40, 30)), path, str(path), image_bytes((40, 30), "L"), Image.new("P", (40, 30))):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (40, 30)
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparency is composited onto white
    assert load_image(clear).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("data, error, message", [
    (image_bytes(fmt="JPEG")[:-500], InvalidInput, "corrupt or truncated image: image file is truncated"),
    (image_bytes(fmt="JPEG")[:400], InvalidInput, "not a readable image: Truncated"),
    (image_bytes(fmt="PNG")[:200], InvalidInput, "truncated|corrupt"),
    (np.random.default_rng(1).bytes(2000), InvalidInput, "not a readable image"),
    (b"", InvalidInput, "not a readable image"),
    ("/nonexistent/a.png", InvalidInput, "not found"),
    (Image.new("RGB", (300, 1)), InvalidInput, "aspect ratio"),
    (np.zeros((8, 8, 3), np.uint8), InvalidInput, "got ndarray"),
])
def test_bad_images(data, error, message):
    with pytest.raises(error, match=message):
        load_image(data)


def test_image_over_the_limit_names_it():
    with pytest.raises(ResourceExhausted, match="64x48 = 3072 pixels, the limit is 1000"):
        load_image(image_bytes((64, 48)), max_pixels=1000)


def test_video_loads_frames_and_track():
    video = load_video([image_bytes((32, 32), seed=i) for i in range(3)], [0.0, 0.5, 1.0],
                       audio=sine(8000, 1.0), audio_sample_rate=8000)
    assert len(video.frames) == 3 and all(f.mode == "RGB" for f in video.frames)
    assert video.fps == pytest.approx(2.0) and len(video.audio) == 16000
    assert load_video(frames(1), [3.0]).fps is None


@pytest.mark.parametrize("args, error, message", [
    (([], []), InvalidInput, "at least one frame"),
    (("abc", [0.0]), InvalidInput, "must be a list of images"),
    ((frames(2), [0.0]), InvalidInput, "2 frames but 1 timestamps"),
    ((frames(3), [0.0, 0.5, 0.5]), InvalidInput, "increase strictly: frame 2 at 0.5 s follows 0.5 s"),
    ((frames(2), [1.0, 0.0]), InvalidInput, "increase strictly"),
    ((frames(2), [0.0, float("nan")]), InvalidInput, "finite"),
    ((frames(2), ["a", 1.0]), InvalidInput, "numbers"),
    ((frames(1) + frames(1, (48, 32)), [0.0, 1.0]), InvalidInput, "frame 1 is 48x32, frame 0 is 32x32"),
    (([b"junk"], [0.0]), InvalidInput, "frame 0: not a readable image"),
    ((frames(1), [0.0], np.zeros(0, np.float32)), InvalidInput, "audio track: raw audio needs its sample rate"),
])
def test_bad_video(args, error, message):
    with pytest.raises(error, match=message):
        load_video(*args)


def test_video_over_the_frame_limit():
    with pytest.raises(ResourceExhausted, match="3 frames, the limit is 2"):
        load_video(frames(3), [0, 1, 2], max_frames=2)


# ---- conversation validation ------------------------------------------------------------------------------


def test_valid_conversations(tmp_path):
    conversation = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What's the weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "1"},
        {"role": "tool", "content": [{"type": "text", "text": "sunny"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "21 degrees."}]},
        {"role": "user", "content": [
            {"type": "audio", "audio": str(tmp_path / "a.wav")},
            {"type": "audio", "audio": np.zeros(800, np.float32), "sample_rate": 8000},
            {"type": "image", "image": b"png bytes"},
            {"type": "video", "video": {"frames": ["f0.png"], "timestamps": [0.0]}},
            {"type": "text", "text": "and this?"},
        ]},
    ]
    out = validate_conversation(conversation)
    assert out[2]["content"] == "" and conversation[2]["content"] is None  # a normalized copy
    assert [m["role"] for m in out] == [m["role"] for m in conversation]
    assert validate_conversation([]) == []


@pytest.mark.parametrize("conversation, message", [
    ({"role": "user", "content": "hi"}, "must be a list of messages, got dict"),
    (["hi"], r"messages\[0\]: a message must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "bot", "content": "c"}],
     r"messages\[2\]: unknown role 'bot'"),
    ([{"content": "hi"}], r"messages\[0\]: missing 'role'"),
    ([{"role": "user"}], r"messages\[0\]: missing 'content'"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string or a list of parts, got int"),
    ([{"role": "user", "content": "hi", "extra": 1}], r"unknown key\(s\) \['extra'\]"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message must come first"),
    ([{"role": "user", "content": ["hi"]}], r"content\[0\]: a content part must be an object"),
    ([{"role": "user", "content": [{"text": "hi"}]}], r"content\[0\]: missing 'type'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}], "unknown part type 'image_url'"),
    ([{"role": "user", "content": [{"type": "image"}]}], "an image part needs a 'image' field|needs a 'image'"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text must be a string, got int"),
    ([{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}], r"unknown key\(s\) \['x'\]"),
    ([{"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}], "only allowed in user messages"),
    ([{"role": "user", "content": [{"type": "audio", "audio": np.zeros(10)}]}], "needs 'sample_rate'"),
    ([{"role": "user", "content": [{"type": "audio", "audio": 3}]}], "audio must be a path"),
    ([{"role": "user", "content": [{"type": "image", "image": 3}]}], "image must be a path"),
    ([{"role": "user", "content": [{"type": "video", "video": ["a.png"]}]}], "video must be a VideoInput"),
    ([{"role": "user", "content": "a", "tool_calls": []}], "only assistant messages have tool_calls"),
    ([{"role": "assistant", "content": "", "tool_calls": {}}], "tool_calls must be a list"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], r"tool_calls\[0\]: .*function name"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": 1}]}], "arguments must be"),
])
def test_invalid_conversations(conversation, message):
    with pytest.raises(InvalidInput, match=message):
        validate_conversation(conversation)


# ---- build_turn -------------------------------------------------------------------------------------------


def test_text_turn_prompt_and_system(processor):
    turn = build_turn(processor, parts=[text_part("Hello")])
    assert turn.prompt_text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert turn.processor_outputs["input_ids"].shape == (1, len(processor.tokenizer(turn.prompt_text).input_ids))
    history = [{"role": "system", "content": "old"}, {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hey"}]
    replaced = build_turn(processor, history=history, system="new", parts=[text_part("x")])
    assert replaced.prompt_text.startswith("<|im_start|>system\nnew<|im_end|>\n<|im_start|>user\nhi<|im_end|>")
    assert replaced.prompt_text.count("system") == 1 and [m["role"] for m in replaced.messages][-1] == "user"
    prepended = build_turn(processor, history=history[1:], system="new", parts=[text_part("x")])
    assert prepended.prompt_text == replaced.prompt_text
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert '"name": "weather"' in build_turn(processor, parts=[text_part("x")], tools=tools).prompt_text


@pytest.mark.parametrize("kwargs, message", [
    ({}, "empty turn"), ({"parts": [text_part("  \n"), text_part("")]}, "empty turn"),
    ({"parts": [text_part(3)]}, r"parts\[0\]: text must be a string"),
    ({"parts": "hello"}, "parts must be a list of content parts, got str"),
    ({"parts": [text_part("x"), video_part(frames(1))]}, r"parts\[1\]: video must be a VideoInput or an object"),
    ({"parts": [audio_part(b"junk")]}, r"parts\[0\]: cannot decode audio"),
    ({"parts": [image_part(image_bytes()), text_part("and"), image_part(b"junk")]},
     r"parts\[2\]: not a readable image"),
    ({"parts": [{"type": "sound", "sound": b""}]}, r"parts\[0\]: unknown part type 'sound'"),
    ({"parts": [text_part("x")], "history": [{"role": "user", "content": [{"type": "audio", "audio": b"junk"}]}]},
     r"messages\[0\].content\[0\]: cannot decode audio"),
    ({"parts": [text_part("x")], "tools": {"name": "f"}}, "tools must be a list"),
])
def test_bad_turns(processor, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        build_turn(processor, **kwargs)


def test_audio_placeholders_match_the_length_formula(processor):
    clips = [sine(16000, 1.0), sine(16000, 1.5), sine(44100, 0.77)]
    assert [audio_tokens(16000), audio_tokens(24000)] == [13, 20]
    turn = build_turn(processor, parts=[*(audio_part(wav_bytes(c, r)) for c, r in zip(clips, (16000, 16000, 44100))),
                                        text_part("hi")])
    lengths = [len(p["audio"].samples) for p in turn.messages[-1]["content"] if p["type"] == "audio"]
    out = turn.processor_outputs
    assert lengths[:2] == [16000, 24000] and abs(lengths[2] - 0.77 * 16000) <= 1
    assert count(out, AUDIO_PAD) == sum(audio_tokens(n) for n in lengths)
    assert out["feature_attention_mask"].sum(-1).tolist() == [n // 160 for n in lengths]
    assert turn.prompt_text.endswith("<|audio_end|>hi<|im_end|>\n<|im_start|>assistant\n")


def test_history_media_are_processed_in_order(processor, tmp_path):
    sf.write(tmp_path / "first.wav", sine(8000, 2.0), 8000)
    history = [
        {"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "first.wav")},
                                     {"type": "image", "image": image_bytes((64, 64))},
                                     {"type": "text", "text": "what is this?"}]},
        {"role": "assistant", "content": "a beep"},
    ]
    turn = build_turn(processor, history=history, parts=[
        audio_part(AudioInput(sine(16000, 0.5), 16000)), image_part(image_bytes((128, 64))), text_part("and this?")])
    out = turn.processor_outputs
    assert out["feature_attention_mask"].sum(-1).tolist() == [200, 50]  # history first
    assert out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8]]
    assert count(out, IMAGE_PAD) == int(out["image_grid_thw"].prod(-1).sum()) // 4
    assert count(out, AUDIO_PAD) == audio_tokens(32000) + audio_tokens(8000)
    assert isinstance(turn.messages[0]["content"][0]["audio"], AudioInput)  # reusable as the next history
    again = build_turn(processor, history=turn.messages, parts=[text_part("more")])
    assert torch.equal(again.processor_outputs["input_features"], out["input_features"])


IMAGE, AUDIO = "<|vision_start|><|image_pad|><|vision_end|>", "<|audio_start|><|audio_pad|><|audio_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def test_parts_keep_their_order_in_the_prompt(processor):
    small, wide = image_bytes((64, 64)), image_bytes((128, 64))
    turn = build_turn(processor, parts=[text_part("This one: "), image_part(wide), text_part(" and this one: "),
                                        image_part(small), text_part("  "), audio_part(AudioInput(sine(16000, 0.5),
                                                                                                  16000))])
    assert turn.prompt_text == (f"<|im_start|>user\nThis one: {IMAGE} and this one: {IMAGE}{AUDIO}<|im_end|>\n"
                                "<|im_start|>assistant\n")  # the blank part is left out
    assert [p["type"] for p in turn.messages[-1]["content"]] == ["text", "image", "text", "image", "audio"]
    out = turn.processor_outputs
    assert out["image_grid_thw"].tolist() == [[1, 4, 8], [1, 4, 4]]  # the images in the order given
    ids = out["input_ids"][0].tolist()
    assert ids.index(AUDIO_START) > len(ids) - 1 - ids[::-1].index(IMAGE_PAD)  # the audio after both images


def test_a_video_with_its_track_stays_one_part_where_it_stands(processor):
    track = sine(16000, 1.0)
    video = load_video(frames(4), [0.0, 0.25, 0.5, 0.75], audio=track, audio_sample_rate=16000)
    turn = build_turn(processor, parts=[text_part("Watch: "), video_part(video), audio_part(AudioInput(sine(16000, 0.5),
                                                                                                     16000))])
    assert turn.prompt_text == f"<|im_start|>user\nWatch: {VIDEO}{AUDIO}<|im_end|>\n<|im_start|>assistant\n"
    out = turn.processor_outputs
    assert out["feature_attention_mask"].sum(-1).tolist() == [100, 50]  # the track first: its video comes first


def test_video_grid_odd_frames_and_per_video_fps(processor):
    three = load_video(frames(3), [0.0, 0.25, 0.5])  # 4 fps, odd count: the processor repeats the last frame
    two = load_video(frames(2), [10.0, 11.0])  # 1 fps
    one = load_video(frames(1), [5.0])
    out = build_turn(processor, parts=[video_part(three), video_part(two), video_part(one), text_part("hi")])
    out = out.processor_outputs
    assert out["video_grid_thw"][:, 0].tolist() == [2, 1, 1]
    assert out["video_second_per_grid"].tolist() == pytest.approx([0.5, 2.0, 2.0])  # temporal_patch_size / fps
    assert count(out, VIDEO_PAD) == int(out["video_grid_thw"].prod(-1).sum()) // 4
    assert "use_audio_in_video" not in out


def test_video_with_audio_track_interleaves(processor):
    video = load_video(frames(4), [0.0, 0.25, 0.5, 0.75], audio=sine(16000, 1.0), audio_sample_rate=16000)
    out = build_turn(processor, parts=[audio_part(AudioInput(sine(16000, 0.5), 16000)), video_part(video),
                                       text_part("hi")])
    out = out.processor_outputs
    assert out["use_audio_in_video"] is True
    assert out["feature_attention_mask"].sum(-1).tolist() == [50, 100]  # standalone audio, then the track
    assert count(out, AUDIO_PAD) == audio_tokens(8000) + audio_tokens(16000)
    assert count(out, VIDEO_PAD) == int(out["video_grid_thw"].prod()) // 4
    ids = out["input_ids"][0].tolist()
    start = ids.index(VISION_START)
    assert ids[start + 1] == AUDIO_START
    # Grid 1 (0.5 s) comes after the audio tokens of its first 0.5 s: 0.5 * 13 positions -> 7 audio tokens.
    block = ids[start + 2: start + 2 + count(out, VIDEO_PAD) + audio_tokens(16000)]
    per_grid = int(out["video_grid_thw"][0, 1:].prod()) // 4
    assert block[:per_grid] == [VIDEO_PAD] * per_grid and block[per_grid: per_grid + 7] == [AUDIO_PAD] * 7


def test_video_audio_rules(processor):
    track = sine(16000, 1.0)
    silent = load_video(frames(2), [0.0, 0.5])
    loud = load_video(frames(2), [0.0, 0.5], audio=track, audio_sample_rate=16000)
    loud_fast = load_video(frames(2), [0.0, 0.25], audio=track, audio_sample_rate=16000)
    with pytest.raises(InvalidInput, match="every video in the conversation has an audio track or none"):
        build_turn(processor, parts=[video_part(silent), video_part(loud)])
    with pytest.raises(InvalidInput, match=r"share one frame rate, got \[2.0, 4.0\] fps"):
        build_turn(processor, parts=[video_part(loud), video_part(loud_fast)])


@pytest.mark.parametrize("media", ["text", "audio", "image", "audio+image", "video", "video+track"])
def test_reference_generate_accepts_processor_outputs(processor, reference, media):
    parts = []
    if "audio" in media:
        parts.append(audio_part(wav_bytes(sine(48000, 0.6, channels=2), 48000)))
    if "image" in media:
        parts.append(image_part(image_bytes((64, 64))))
    if "video" in media:
        track = dict(audio=sine(16000, 0.5), audio_sample_rate=16000) if "track" in media else {}
        parts.append(video_part(load_video(frames(2), [0.0, 0.5], **track)))
    inputs = build_turn(processor, parts=[*parts, text_part("Describe.")]).processor_outputs
    with torch.inference_mode():
        sequences = reference.generate(**inputs, thinker_max_new_tokens=3, thinker_do_sample=False,
                                       return_audio=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(sequences[:, :prompt_len], inputs["input_ids"])
    assert 1 <= sequences.shape[1] - prompt_len <= 3
