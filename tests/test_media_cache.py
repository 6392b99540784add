"""History media are decoded once per process (services/media_cache.py): a session's later turns reuse them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.media_cache import HISTORY, DecodedMedia
from services.preprocess import AudioInput, build_turn
from services.turn_parts import text_part


def _history(media) -> list[dict]:
    audio, image = Path(media["audio"]).read_bytes(), Path(media["image"]).read_bytes()
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "image", "image": image},
                                         {"type": "text", "text": "what are these?"}]},
            {"role": "assistant", "content": "a chirp and noise"}]


def test_a_later_turn_decodes_none_of_the_history_again_and_renders_the_same(processor, media):
    history = _history(media)
    first = build_turn(processor, history=history, parts=[text_part("and now?")])
    hits, misses = HISTORY.hits, HISTORY.misses
    again = build_turn(processor, history=_history(media), parts=[text_part("and now?")])  # the store gives new bytes objects
    assert (HISTORY.hits - hits, HISTORY.misses - misses) == (2, 0)
    for name in ("input_ids", "input_features", "pixel_values"):
        assert torch.equal(first.processor_outputs[name], again.processor_outputs[name])


def test_paths_are_decoded_every_time(processor, media):
    history = [{"role": "user", "content": [{"type": "audio", "audio": media["audio"]}]},
               {"role": "assistant", "content": "a chirp"}]
    misses, hits = HISTORY.misses, HISTORY.hits
    build_turn(processor, history=history, parts=[text_part("again")])
    assert (HISTORY.misses, HISTORY.hits) == (misses, hits)  # a file may change: not cached by its name


def test_the_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used():
    cache = DecodedMedia(max_bytes=3000)
    decoded = []

    def decode(n):
        decoded.append(n)
        return AudioInput(np.zeros(250, np.float32) + n, 16000)  # 1000 bytes each

    for n in (1, 2, 3):
        cache.get("audio", bytes([n]), {}, lambda n=n: decode(n))
    cache.get("audio", bytes([1]), {}, lambda: decode(1))  # a hit: 1 is now the most recent
    cache.get("audio", bytes([4]), {}, lambda: decode(4))  # evicts 2
    assert cache.nbytes == 3000 and decoded == [1, 2, 3, 4]
    cache.get("audio", bytes([2]), {}, lambda: decode(2))
    assert decoded == [1, 2, 3, 4, 2]
    value = cache.get("audio", bytes([2]), {}, lambda: decode(2))
    assert decoded[-1] == 2 and len(decoded) == 5
    with pytest.raises(ValueError):  # shared between turns: nobody may change it
        value.samples[0] = 1.0


def test_the_decode_parameters_are_part_of_the_key():
    cache, calls = DecodedMedia(), []
    for rate in (16000, 24000, 16000):
        cache.get("audio", b"\x00\x01" * 100, {"rate": rate}, lambda: calls.append(1) or AudioInput(
            np.zeros(4, np.float32), 16000))
    assert len(calls) == 2
