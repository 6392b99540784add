"""The served processor tokenizes each run of a medium's placeholders once (services/placeholder_runs.py): its ids
equal the tokenizer's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.placeholder_runs import RunLengthPlaceholders
from services.preprocess import AudioInput, build_turn, load_processor, load_video
from services.turn_parts import audio_part, image_part, text_part, video_part
from tests.test_preprocess import frames, image_bytes, sine


@pytest.fixture(scope="module")
def served(tiny_ckpt):
    return load_processor(tiny_ckpt)


@pytest.fixture
def texts_tokenized(served, monkeypatch):
    """The texts the served tokenizer's own code is given."""
    seen = []
    base = next(c for c in type(served.tokenizer).__mro__
                if "__call__" in vars(c) and not issubclass(c, RunLengthPlaceholders))
    own = base.__call__

    def spy(self, text=None, *args, **kwargs):
        if self is served.tokenizer:
            seen.append(text if isinstance(text, str) else "".join(text))
        return own(self, text, *args, **kwargs)

    monkeypatch.setattr(base, "__call__", spy)
    return seen


def turns():
    track = sine(16000, 1.0)
    video = load_video(frames(4), [0.0, 0.25, 0.5, 0.75], audio=track, audio_sample_rate=16000)
    return {
        "audio": [text_part("Listen: "), audio_part(AudioInput(sine(16000, 30.0), 16000))],
        "images and audios": [image_part(image_bytes((128, 64))), text_part(" then "),
                              audio_part(AudioInput(sine(16000, 0.5), 16000)), image_part(image_bytes((64, 64))),
                              audio_part(AudioInput(sine(16000, 2.0, freq=300.0), 16000))],
        "video with its track": [text_part("Watch: "), video_part(video)],  # video and audio runs interleave
    }


@pytest.mark.parametrize("name", list(turns()))
def test_the_served_processor_gives_the_plain_tokenizers_ids(served, processor, texts_tokenized, name):
    parts = turns()[name]
    ours, theirs = (build_turn(p, parts=parts).processor_outputs for p in (served, processor))
    for key in ("input_ids", "attention_mask"):
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    pads = [served.audio_token, served.image_token, served.video_token]
    # The tokenizer's own code saw each run as one placeholder: the text it was given is short.
    assert texts_tokenized and not any(p * 2 in t for t in texts_tokenized for p in pads)


def test_direct_calls_equal_the_tokenizers_own(served, processor):
    text = "<|im_start|>user\nhi <|audio_start|>" + "<|audio_pad|>" * 40 + "<|audio_end|>x<|image_pad|><|im_end|>\n"
    for args, kwargs in (((text,), {}), (([text],), {}), (([text],), {"return_tensors": "pt"}),
                         ((text,), {"return_tensors": "pt", "padding_side": "left"})):
        ours, theirs = served.tokenizer(*args, **kwargs), processor.tokenizer(*args, **kwargs)
        assert ours.keys() == theirs.keys()
        for key in theirs:
            a, b = ours[key], theirs[key]
            assert (torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b), (args, kwargs, key)
    # Anything else is the tokenizer's own call.
    ours = served.tokenizer(text, truncation=True, max_length=10, return_tensors="np")
    assert np.array_equal(ours["input_ids"], processor.tokenizer(text, truncation=True, max_length=10,
                                                                 return_tensors="np")["input_ids"])


def test_the_placeholder_count_check_is_the_processors_own(served, processor):
    """The served processor's check that the ids hold every placeholder of the text (no truncation) counts them with
    `str.count`, not a regex's list of matches: the parent's result, a placeholder marked as control text (the
    marker just before it) not counted, and the parent's error on a mismatch."""
    from services.placeholder_runs import _MARKER, check_placeholder_counts

    assert served._check_special_mm_tokens.__func__ is check_placeholder_counts
    pad, modalities = served.audio_token, ["audio", "image", "video"]
    text = ["a" + pad * 5 + _MARKER + pad + "b" + pad]  # 6 placeholders, one of them marked
    for count, fits in ((6, True), (7, False), (5, False)):
        ids = {"input_ids": torch.tensor([[served.audio_token_id] * count + [1, 2]])}
        errors = []
        for p in (served, processor):
            try:
                p._check_special_mm_tokens(text, ids, modalities)
                errors.append(None)
            except ValueError as e:
                errors.append(str(e))
        assert errors[0] == errors[1] and (errors[0] is None) == fits, count
