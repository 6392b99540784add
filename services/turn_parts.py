"""A user turn's content: an ordered list of parts, in the chat-message format (a user message's `content` list).

    {"type": "text", "text": str}
    {"type": "audio", "audio": path | file bytes | AudioInput | PCM array[, "sample_rate": int]}
    {"type": "image", "image": path | file bytes | PIL image}
    {"type": "video", "video": VideoInput | {"frames", "timestamps"[, "audio", "audio_sample_rate"]}}

The model gets the parts in the order given: the chat template renders each placeholder or text where it stands
(`services.preprocess.build_turn`), so "this one: [image] and this one: [image]" stays that sentence. A video's sound
track is part of its video, never a part of its own. A text part of only whitespace is left out (a turn of only
such text is empty), as a blank `text` was before turns were ordered.

`TurnRequest.parts`, `build_turn(parts=...)`, `OmniClient.converse(parts=...)`, the gateway's stored session history
and `omni generate --conversation` all use this one format. The helpers below build parts; this module imports
nothing heavy, so a client can use it without torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from services.errors import InvalidInput

KINDS = ("text", "audio", "image", "video")


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def audio_part(audio, sample_rate: int | None = None) -> dict:
    """`audio`: a path, encoded file bytes, an `AudioInput`, or a PCM array with its `sample_rate`."""
    return {"type": "audio", "audio": audio} | ({"sample_rate": sample_rate} if sample_rate is not None else {})


def image_part(image) -> dict:
    return {"type": "image", "image": image}


def video_part(video) -> dict:
    """`video`: a `VideoInput`, or a mapping with `frames` and `timestamps` (optional `audio`, `audio_sample_rate`)."""
    return {"type": "video", "video": video}


def is_blank(part: Mapping) -> bool:
    """A text part the prompt leaves out: empty or whitespace only."""
    return part.get("type") == "text" and isinstance(part.get("text"), str) and not part["text"].strip()


def kind_counts(parts: Sequence) -> Counter:
    """How many parts of each kind a turn holds (blank text not counted); a malformed list is InvalidInput (the
    full check of each part's value is `build_turn`'s)."""
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
        raise InvalidInput(f"parts must be a list of content parts, got {type(parts).__name__}")
    counts = Counter()
    for j, part in enumerate(parts):
        if not isinstance(part, Mapping) or part.get("type") not in KINDS:
            got = repr(part.get("type")) if isinstance(part, Mapping) else type(part).__name__
            raise InvalidInput(f"parts[{j}]: a part must be an object with type one of {', '.join(KINDS)}; got {got}")
        if not is_blank(part):
            counts[part["type"]] += 1
    return counts
