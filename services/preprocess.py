"""User input -> what the engines take: decoded media, a validated conversation, and the processor's tensors.

`build_turn` renders the chat template over the whole conversation (history + the new user turn, its parts in the
order given: `services.turn_parts`) and runs `Qwen3OmniMoeProcessor` once over the prompt and the media of every
turn, in prompt order. Its `processor_outputs` go to `Qwen3OmniMoeForConditionalGeneration.generate`
unchanged. Bad input raises `InvalidInput`, input over a limit `ResourceExhausted`, each with a one-line message.

What the transformers 5.23 processor does with video (checked against its source):
- Video is accepted as a list of PIL frames per video (`videos=[[f0, f1, ...], ...]`): the base video processor
  turns each frame into a tensor. Frames are already sampled by the client, so we pass `do_sample_frames=False`.
- Frames are grouped in pairs (`temporal_patch_size=2`); an odd count is padded by repeating the last frame
  (`Qwen2VLVideoProcessor.patchify`, video_processing_qwen2_vl.py:286-289), so a 1-frame video is one grid step.
- The processor's only notion of time is one scalar `videos_kwargs["fps"]` per call (default 1.0), giving
  `video_second_per_grid = temporal_patch_size / fps` for every video (processing_qwen3_omni_moe.py:239-244).
  We derive each video's fps from its timestamps as (n - 1) / (t_last - t_first) and write the per-video value
  into `video_second_per_grid` after the call. The model places temporal grid g at g * second_per_grid seconds
  (TM-RoPE, `get_rope_index`): spacing is assumed uniform at the mean rate, so with uneven spacing only the first
  and last timestamps matter and the frames in between are positioned as if evenly spaced (we log a warning).
- The processor class overrides the saved video processor's size with its own default
  (`videos_kwargs["size"]["shortest_edge"] = 128 * 32 * 32`, processing_qwen3_omni_moe.py:133-138), so every
  frame pair costs at least 128 tokens. We pass `cap_pixels_per_frame=True` (qwen-vl-utils' total pixel budget).
- An explicitly given audio track works: `load_audio_from_video=True` with `audio` holding one entry per audio
  slot and `audio_from_video_indices` naming the video of each slot (None for standalone audio) takes the track
  from `audio` instead of decoding the video file (processing_utils.py:2719-2725; decoding needs torchcodec).
  The video placeholder then expands to `<|audio_start|>` + video/audio tokens interleaved by time +
  `<|audio_end|>`, and `generate` needs `use_audio_in_video=True`, which we put into `processor_outputs`.
  Two limits of the reference follow: the interleaving uses the one scalar fps, so videos with audio tracks must
  share a frame rate; and `get_rope_index` reads `use_audio_in_video` per request and counts only videos whose
  placeholder starts with `<|audio_start|>`, so a silent video next to one with a track gets text positions
  (modeling_qwen3_omni_moe.py:313-325). Both are rejected with `InvalidInput`.

Audio shorter than 201 samples crashes the Whisper feature extractor (reflect padding of n_fft // 2); we require
one full 25 ms STFT window (400 samples at 16 kHz).

Media may be given as file paths: callers that take requests from the network must pass bytes, not paths.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import numpy as np
import PIL.Image
import PIL.ImageOps
import soundfile as sf
import soxr
import torch

from services.errors import CheckpointError, InvalidInput, ResourceExhausted
from services.log_mel import LogMelExtractor
from services.media_cache import HISTORY
from services.placeholder_runs import RunLengthPlaceholders, check_placeholder_counts
from services.turn_parts import is_blank

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # the Whisper feature extractor's rate
MIN_SAMPLES = 400  # one 25 ms STFT window (n_fft) at 16 kHz
MIN_SOURCE_RATE, MAX_SOURCE_RATE = 1_000, 384_000
_QUALITY = "HQ"  # soxr's
MAX_ASPECT_RATIO = 200  # Qwen2-VL smart_resize raises beyond this
ROLES = ("system", "user", "assistant", "tool")
MEDIA_TYPES = ("audio", "image", "video")
_MESSAGE_KEYS = {"role", "content", "name", "tool_call_id", "tool_calls"}
_VIDEO_KEYS = {"frames", "timestamps", "audio", "audio_sample_rate"}


# ---- audio -----------------------------------------------------------------------------------------------


@dataclass
class AudioInput:
    """Decoded audio: mono float32 at 16 kHz, and the rate it arrived at."""

    samples: np.ndarray
    source_rate: int


def decode_audio(
    data: bytes | str | Path | np.ndarray | AudioInput, sample_rate: int | None = None, *, max_seconds: float = 600.0
) -> AudioInput:
    """WAV/FLAC/OGG bytes or path (via soundfile), or a raw PCM array with its `sample_rate`, -> 16 kHz mono."""
    if isinstance(data, AudioInput):
        return data
    if isinstance(data, np.ndarray):
        if sample_rate is None:
            raise InvalidInput("raw audio needs its sample rate")
        _check_rate(sample_rate)
        pcm = _pcm_to_float(data)
    elif isinstance(data, (bytes, bytearray, memoryview, str, Path)):
        pcm, file_rate = _read_audio_file(data, max_seconds)
        if sample_rate is not None and sample_rate != file_rate:
            raise InvalidInput(f"sample rate {sample_rate} given but the audio file says {file_rate}")
        sample_rate = file_rate
    else:
        raise InvalidInput(f"audio must be file bytes, a path or a PCM array, got {type(data).__name__}")

    _check_length(pcm.shape[0], sample_rate, max_seconds)
    if not np.isfinite(pcm).all():
        raise InvalidInput("audio contains NaN or infinite samples")
    mono = _mono(pcm)
    if sample_rate != SAMPLE_RATE:
        mono = soxr.resample(mono, sample_rate, SAMPLE_RATE, quality=_QUALITY)
    return _audio_input(mono, sample_rate)


class PcmStream:
    """16-bit PCM decoded to 16 kHz mono as its chunks arrive, so that decoding a long stream at its end costs what
    was not fed before: `decode` gives what `decode_audio` gives for the whole PCM, bit for bit (soxr's stream gives
    its one-shot output, however it is fed: tests/test_streamed_audio.py). The samples go into one buffer that grows
    by half when full, so the end copies none of them (a third of it at most is unused); a write never touches a
    sample already decoded, so `so_far`'s views stay as they are. Thread-safe: fed from worker threads."""

    def __init__(self, sample_rate: int, channels: int):
        _check_rate(sample_rate)
        self.sample_rate, self.channels = sample_rate, channels
        self._soxr = (None if sample_rate == SAMPLE_RATE else
                      soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32", quality=_QUALITY))
        self._buf = np.empty(0, np.float32)
        self._n = 0  # samples decoded so far, in _buf[:_n]
        self._fed = 0  # bytes of the PCM resampled so far: whole frames
        self._done: AudioInput | None = None
        self._lock = threading.Lock()

    def feed(self, data: bytes | bytearray) -> None:
        """Resample the whole frames of `data` (the stream's PCM so far, or a prefix of it) not fed before."""
        with self._lock:
            self._feed(data, last=False)

    def so_far(self) -> np.ndarray:
        """The samples decoded so far, read-only: a prefix of `decode`'s (the resampler holds back its last few)."""
        with self._lock:
            view = self._buf[:self._n]
        view.flags.writeable = False
        return view

    def decode(self, data: bytes | bytearray, max_seconds: float = 600.0) -> AudioInput:
        """All of `data` decoded: the stream ends here. `data` must be whole frames."""
        with self._lock:
            if self._done is None:
                _check_length(len(data) // (2 * self.channels), self.sample_rate, max_seconds)
                self._feed(data, last=True)
                self._buf.flags.writeable = False  # written no more: its samples may be kept as they are
                self._done = _audio_input(self._buf[:self._n], self.sample_rate)
            elif len(data) != self._fed:
                raise RuntimeError("the PCM stream was decoded before its last chunk")
            return self._done

    def _feed(self, data: bytes | bytearray, last: bool) -> None:
        if self._done is not None:
            raise RuntimeError("the PCM stream was decoded before its last chunk")
        size = len(data)  # once: the event loop may extend `data` meanwhile
        end = size - size % (2 * self.channels)
        if end <= self._fed and not last:
            return
        pcm = np.frombuffer(data[self._fed:end], "<i2").astype(np.float32) / 32768.0  # as `_pcm_to_float`
        self._fed = max(end, self._fed)
        mono = _mono(pcm.reshape(-1, self.channels) if self.channels > 1 else pcm)
        self._append(mono if self._soxr is None else self._soxr.resample_chunk(mono, last=last))

    def _append(self, samples: np.ndarray) -> None:
        n = self._n + len(samples)
        if n > len(self._buf):
            grown = np.empty(max(n, len(self._buf) * 3 // 2, SAMPLE_RATE), np.float32)
            grown[:self._n] = self._buf[:self._n]
            self._buf = grown
        self._buf[self._n:n] = samples
        self._n = n


def _check_length(samples: int, sample_rate: int, max_seconds: float) -> None:
    if samples == 0:
        raise InvalidInput("audio is empty")
    if samples / sample_rate > max_seconds:
        raise ResourceExhausted(f"audio is {samples / sample_rate:.1f} s long, the limit is {max_seconds:g} s")


def _mono(pcm: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pcm.mean(axis=1, dtype=np.float32) if pcm.ndim == 2 else pcm)


def _audio_input(mono: np.ndarray, sample_rate: int) -> AudioInput:
    if len(mono) < MIN_SAMPLES:
        raise InvalidInput(f"audio is too short: {len(mono)} samples at 16 kHz, need at least {MIN_SAMPLES} (25 ms)")
    samples = mono.astype(np.float32, copy=False)
    samples.flags.writeable = False  # shared (a stream's decode, the log-mel frames kept: `services.log_mel`)
    return AudioInput(samples, int(sample_rate))


def load_audio(
    data: bytes | str | Path | np.ndarray, sample_rate: int | None = None, *, max_seconds: float = 600.0
) -> np.ndarray:
    """Decoded mono float32 samples at 16 kHz (any input rate is resampled with soxr, high quality); read-only, as
    all decoded audio (`_audio_input`): copy them to write."""
    return decode_audio(data, sample_rate, max_seconds=max_seconds).samples


def _check_rate(sample_rate) -> None:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)):
        raise InvalidInput(f"sample rate must be an integer, got {sample_rate!r}")
    if not MIN_SOURCE_RATE <= sample_rate <= MAX_SOURCE_RATE:
        raise InvalidInput(f"sample rate {sample_rate} Hz is outside {MIN_SOURCE_RATE}..{MAX_SOURCE_RATE} Hz")


def _pcm_to_float(data: np.ndarray) -> np.ndarray:
    """[samples] or [samples, channels] PCM -> float32 in [-1, 1)."""
    if data.ndim == 2 and data.shape[1] > 16 and data.shape[0] <= 16:
        raise InvalidInput(f"2-D audio must be [samples, channels], got shape {list(data.shape)}")
    if data.ndim not in (1, 2):
        raise InvalidInput(f"audio array must be [samples] or [samples, channels], got shape {list(data.shape)}")
    if data.dtype == np.int16:
        return data.astype(np.float32) / 32768.0
    if data.dtype == np.int32:
        return (data / 2147483648.0).astype(np.float32)
    if data.dtype in (np.float32, np.float64):
        return np.array(data, dtype=np.float32)  # a copy: decoded audio is read-only (`_audio_input`), not theirs
    raise InvalidInput(f"audio array dtype must be int16, int32, float32 or float64, got {data.dtype}")


def _read_audio_file(data: bytes | bytearray | memoryview | str | Path, max_seconds: float) -> tuple[np.ndarray, int]:
    try:
        with open_audio_file(data) as f:
            _check_rate(f.samplerate)
            # The header's length bounds the work before decoding anything.
            if f.frames / f.samplerate > max_seconds:
                raise ResourceExhausted(
                    f"audio is {f.frames / f.samplerate:.1f} s long, the limit is {max_seconds:g} s"
                )
            return f.read(dtype="float32", always_2d=True), f.samplerate
    except sf.SoundFileError as e:
        raise InvalidInput(f"cannot decode audio: {_soundfile_reason(e)}") from e


def open_audio_file(data: bytes | bytearray | memoryview | str | Path) -> sf.SoundFile:
    """The file opened for reading: its header (frames, channels, rate) is read, no samples yet."""
    if isinstance(data, (str, Path)):
        if not Path(data).is_file():
            raise InvalidInput(f"audio file not found: {data}")
        return sf.SoundFile(data)
    try:
        return sf.SoundFile(io.BytesIO(bytes(data)))
    except sf.SoundFileError as e:
        raise InvalidInput(f"cannot decode audio: {_soundfile_reason(e)}") from e


def _soundfile_reason(e: sf.SoundFileError) -> str:
    # libsndfile's own words; str(e) names the file object ("<_io.BytesIO object at 0x...>"), useless to a client.
    return getattr(e, "error_string", None) or "not a WAV, FLAC or OGG file soundfile can read"


# ---- images and video ----------------------------------------------------------------------------------


def load_image(data: bytes | str | Path | PIL.Image.Image, *, max_pixels: int = 50_000_000,
               target_pixels: int | None = None) -> PIL.Image.Image:
    """Decode fully (a truncated file fails here, not in the processor), apply EXIF rotation, convert to RGB.

    `target_pixels`: the most pixels the processor resizes to (its `size["longest_edge"]`); an image of 4x that
    or more is decoded smaller (JPEG's DCT scaling, `draft`) or reduced right after decoding (other formats, which
    PIL decodes only at full size), by an integer factor that keeps it above the target, so the processor never
    holds a full-size copy. Smaller images reach the processor untouched, exactly as in the reference."""
    from transformers.image_transforms import convert_to_rgb

    if isinstance(data, PIL.Image.Image):
        image = data
    elif isinstance(data, (bytes, bytearray, memoryview, str, Path)):
        image = open_image(data)
    else:
        raise InvalidInput(f"image must be file bytes, a path or a PIL image, got {type(data).__name__}")

    width, height = image.size
    if width * height > max_pixels:
        raise ResourceExhausted(f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}")
    if min(width, height) == 0:
        raise InvalidInput(f"image is empty ({width}x{height})")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidInput(f"image aspect ratio {width}x{height} exceeds {MAX_ASPECT_RATIO}:1")
    try:
        draft_for(image, target_pixels)
        image.load()
        if (factor := reduction(*image.size, target_pixels)) > 1:
            image = image.reduce(factor)
        image = PIL.ImageOps.exif_transpose(image)
        # transformers' conversion: transparency composited onto white.
        return PIL.Image.fromarray(convert_to_rgb(image, return_numpy=True))
    except PIL.Image.DecompressionBombError as e:
        raise ResourceExhausted(f"image is too large: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"corrupt or truncated image: {e}") from e


def open_image(data: bytes | bytearray | memoryview | str | Path) -> PIL.Image.Image:
    """The image opened lazily: format and size are read from its header, no pixels are decoded. PIL's own
    decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, 2x of it raises here) stays as a backstop above the
    gateway's budget (`services.media_budget`)."""
    if isinstance(data, (str, Path)) and not Path(data).is_file():
        raise InvalidInput(f"image file not found: {data}")
    source = data if isinstance(data, (str, Path)) else io.BytesIO(bytes(data))
    try:
        return PIL.Image.open(source)
    except PIL.Image.DecompressionBombError as e:
        raise ResourceExhausted(f"image is too large: {e}") from e
    except PIL.UnidentifiedImageError as e:
        # PIL's message names the file object ("<_io.BytesIO object at 0x...>"), useless to a client.
        raise InvalidInput("not a readable image: not a format Pillow can decode (PNG, JPEG, WebP, GIF, ...)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidInput(f"not a readable image: {e}") from e


def reduction(width: int, height: int, target_pixels: int | None) -> int:
    """The integer factor an image can shrink by and keep at least `target_pixels` (1: none)."""
    if not target_pixels or width * height < 4 * target_pixels:
        return 1
    return math.isqrt(width * height // target_pixels)


def draft_for(image: PIL.Image.Image, target_pixels: int | None) -> None:
    """Ask a lazily opened JPEG to decode at 1/2, 1/4 or 1/8 scale where that stays above `target_pixels`
    (`image.size` then says the reduced size); a no-op for other formats."""
    if (factor := reduction(*image.size, target_pixels)) > 1 and image.format == "JPEG":
        width, height = image.size
        image.draft("RGB", (-(-width // factor), -(-height // factor)))


@dataclass
class VideoInput:
    """Sampled RGB frames of one size, their times in seconds (strictly increasing), optional 16 kHz audio track
    starting at the first frame."""

    frames: list[PIL.Image.Image]
    timestamps: list[float]
    audio: np.ndarray | None = None

    @property
    def fps(self) -> float | None:
        """Mean frame rate from the timestamps; None for a single frame (its grid spans no time)."""
        if len(self.timestamps) < 2:
            return None
        return (len(self.timestamps) - 1) / (self.timestamps[-1] - self.timestamps[0])


def load_video(
    frames: Sequence,
    timestamps: Sequence[float],
    audio: bytes | str | Path | np.ndarray | AudioInput | None = None,
    *,
    audio_sample_rate: int | None = None,
    max_frames: int = 768,
    max_pixels: int = 50_000_000,
    max_seconds: float = 600.0,
    target_pixels: int | None = None,
) -> VideoInput:
    """Decode and check frames (images), timestamps and the optional audio track (anything `decode_audio` takes).
    `target_pixels`: the video processor's largest frame size (see `load_image`)."""
    if isinstance(frames, (str, bytes)) or not isinstance(frames, Sequence):
        raise InvalidInput(f"video frames must be a list of images, got {type(frames).__name__}")
    if len(frames) == 0:
        raise InvalidInput("video needs at least one frame")
    if len(frames) > max_frames:
        raise ResourceExhausted(f"video has {len(frames)} frames, the limit is {max_frames}")
    if isinstance(timestamps, (str, bytes)) or not isinstance(timestamps, Sequence):
        raise InvalidInput("video timestamps must be a list of seconds")
    if len(timestamps) != len(frames):
        raise InvalidInput(f"video has {len(frames)} frames but {len(timestamps)} timestamps")
    try:
        times = [float(t) for t in timestamps]
    except (TypeError, ValueError) as e:
        raise InvalidInput(f"video timestamps must be numbers: {e}") from e
    if not all(math.isfinite(t) for t in times):
        raise InvalidInput("video timestamps must be finite")
    steps = np.diff(times)
    if (steps <= 0).any():
        i = int(np.argmax(steps <= 0))
        raise InvalidInput(f"video timestamps must increase strictly: frame {i + 1} at {times[i + 1]} s "
                           f"follows {times[i]} s")
    if len(steps) > 1 and np.ptp(steps) > 0.25 * steps.mean():
        log.warning("video frame intervals range %.3f..%.3f s; the model assumes uniform spacing at %.2f fps",
                    steps.min(), steps.max(), 1 / steps.mean())

    decoded = []
    for i, frame in enumerate(frames):
        image = _located(f"frame {i}", load_image, frame, max_pixels=max_pixels, target_pixels=target_pixels)
        if decoded and image.size != decoded[0].size:
            raise InvalidInput(f"frame {i} is {image.size[0]}x{image.size[1]}, frame 0 is "
                               f"{decoded[0].size[0]}x{decoded[0].size[1]}: all frames must have one size")
        decoded.append(image)
    track = None
    if audio is not None:
        track = _located("audio track", decode_audio, audio, audio_sample_rate, max_seconds=max_seconds).samples
    return VideoInput(decoded, times, track)


# ---- conversation ----------------------------------------------------------------------------------------


def validate_conversation(obj) -> list[dict]:
    """Check the chat JSON (a list of messages in the processor's format) and return a normalized copy.

    Roles: system (first message only), user, assistant, tool. Content: a string or a list of parts
    `{"type": "text", "text": str}`, `{"type": "audio", "audio": path | bytes | array | AudioInput[, "sample_rate"]}`,
    `{"type": "image", "image": path | bytes | PIL image}`, `{"type": "video", "video": VideoInput | {"frames",
    "timestamps"[, "audio", "audio_sample_rate"]}}`; media only in user messages. Assistant messages may carry
    `tool_calls` (`[{"function": {"name", "arguments"}}]`); their content may then be null.
    """
    if not isinstance(obj, (list, tuple)):
        raise InvalidInput(f"conversation must be a list of messages, got {type(obj).__name__}")
    return [_validate_message(m, f"messages[{i}]", first=i == 0) for i, m in enumerate(obj)]


def _validate_message(message, where: str, first: bool) -> dict:
    if not isinstance(message, Mapping):
        raise InvalidInput(f"{where}: a message must be an object, got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidInput(f"{where}: unknown role {role!r}" if "role" in message else f"{where}: missing 'role'")
    if unknown := set(message) - _MESSAGE_KEYS:
        raise InvalidInput(f"{where}: unknown key(s) {sorted(unknown)}")
    if role == "system" and not first:
        raise InvalidInput(f"{where}: a system message must come first")
    out = dict(message)
    if "tool_calls" in message:
        if role != "assistant":
            raise InvalidInput(f"{where}: only assistant messages have tool_calls")
        _validate_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        if message.get("content") is None:
            out["content"] = ""
    if "content" not in out:
        raise InvalidInput(f"{where}: missing 'content'")
    content = out["content"]
    if isinstance(content, str):
        return out
    if not isinstance(content, (list, tuple)):
        raise InvalidInput(f"{where}.content must be a string or a list of parts, got {type(content).__name__}")
    out["content"] = [_validate_part(p, f"{where}.content[{j}]", media=role == "user") for j, p in enumerate(content)]
    return out


def _validate_part(part, where: str, media: bool) -> dict:
    if not isinstance(part, Mapping):
        raise InvalidInput(f"{where}: a content part must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind not in ("text", *MEDIA_TYPES):
        raise InvalidInput(f"{where}: unknown part type {kind!r}" if "type" in part else f"{where}: missing 'type'")
    if kind != "text" and not media:
        raise InvalidInput(f"{where}: {kind} parts are only allowed in user messages")
    if kind not in part:
        raise InvalidInput(f"{where}: a {kind} part needs a {kind!r} field")
    allowed = {"type", kind} | ({"sample_rate"} if kind == "audio" else set())
    if unknown := set(part) - allowed:
        raise InvalidInput(f"{where}: unknown key(s) {sorted(unknown)} in a {kind} part")
    value = part[kind]
    files = (str, Path, bytes, bytearray, memoryview)
    if kind == "text" and not isinstance(value, str):
        raise InvalidInput(f"{where}: text must be a string, got {type(value).__name__}")
    if kind == "audio":
        if not isinstance(value, (*files, np.ndarray, AudioInput)):
            raise InvalidInput(f"{where}: audio must be a path, bytes, a PCM array or AudioInput, "
                               f"got {type(value).__name__}")
        if isinstance(value, np.ndarray) and "sample_rate" not in part:
            raise InvalidInput(f"{where}: a raw audio array needs 'sample_rate'")
    if kind == "image" and not isinstance(value, (*files, PIL.Image.Image)):
        raise InvalidInput(f"{where}: image must be a path, bytes or a PIL image, got {type(value).__name__}")
    if kind == "video" and not isinstance(value, VideoInput):
        if not isinstance(value, Mapping) or not {"frames", "timestamps"} <= set(value) or set(value) - _VIDEO_KEYS:
            raise InvalidInput(f"{where}: video must be a VideoInput or an object with 'frames' and 'timestamps' "
                               f"(optional 'audio', 'audio_sample_rate')")
    return dict(part)


def _validate_tool_calls(calls, where: str) -> None:
    if not isinstance(calls, (list, tuple)):
        raise InvalidInput(f"{where} must be a list")
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InvalidInput(f"{where}[{k}]: a tool call needs a function name")
        if not isinstance(fn.get("arguments"), (str, Mapping)):
            raise InvalidInput(f"{where}[{k}]: tool call arguments must be a JSON string or an object")


# ---- the turn ---------------------------------------------------------------------------------------------


@dataclass
class TurnInputs:
    """What the engines need for one turn, already processed."""

    processor_outputs: dict  # input_ids [1, L], attention_mask, and per modality present: input_features,
    # feature_attention_mask, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
    # video_second_per_grid; use_audio_in_video=True when videos carry audio tracks
    messages: list[dict]  # the full conversation with decoded media (AudioInput, RGB PIL, VideoInput)
    prompt_text: str  # the rendered chat template, before placeholder expansion


def load_processor(path: str | Path):
    """The checkpoint's `Qwen3OmniMoeProcessor`, its log-mel features computed once per STFT frame of audio seen
    lately (`services.log_mel`: a streamed turn's audio, a session's history), and each run of a medium's
    placeholders tokenized once (`services.placeholder_runs`)."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load the processor/tokenizer: {e}") from e
    processor.feature_extractor = LogMelExtractor.of(processor.feature_extractor)
    RunLengthPlaceholders.adopt(processor.tokenizer, [getattr(processor, f"{kind}_token", None)
                                                      for kind in ("audio", "image", "video")])
    processor._check_special_mm_tokens = MethodType(check_placeholder_counts, processor)
    return processor


def build_turn(
    processor,
    *,
    history: Sequence[dict] = (),
    system: str | None = None,
    parts: Sequence[dict] = (),
    tools: list[dict] | None = None,
) -> TurnInputs:
    """Append the user turn (`parts`, in their order: `services.turn_parts`) and process the whole conversation.

    The prompt is the chat template over the history and the new turn's parts as given; blank text parts are left
    out. `system`, if given, replaces the history's system message or is prepended.
    """
    messages = [_load_media(m, f"messages[{i}]", processor) for i, m in enumerate(validate_conversation(history))]
    if system is not None:
        if not isinstance(system, str):
            raise InvalidInput("system prompt must be a string")
        head = {"role": "system", "content": system}
        messages = [head, *messages[1:]] if messages and messages[0]["role"] == "system" else [head, *messages]
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, Mapping) for t in tools)):
        raise InvalidInput("tools must be a list of JSON schema objects")
    if isinstance(parts, (str, bytes)) or not isinstance(parts, Sequence):
        raise InvalidInput(f"parts must be a list of content parts, got {type(parts).__name__}")

    turn = [_load_part(_validate_part(p, f"parts[{j}]", media=True), f"parts[{j}]", processor)
            for j, p in enumerate(parts)]
    turn = [p for p in turn if not is_blank(p)]
    if not turn:
        raise InvalidInput("empty turn: send at least one text, audio, image or video part")
    messages.append({"role": "user", "content": turn})

    prompt = processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return TurnInputs(_run_processor(processor, prompt, messages), messages, prompt)


def _run_processor(processor, prompt: str, messages: list[dict]) -> dict:
    # Media in prompt order; audio slots include video tracks (slot -> video index, None for standalone audio).
    audios, slots, images, videos = [], [], [], []
    for message in messages:
        for part in message["content"] if isinstance(message["content"], list) else ():
            if part["type"] == "audio":
                audios.append(part["audio"].samples)
                slots.append(None)
            elif part["type"] == "image":
                images.append(part["image"])
            elif part["type"] == "video":
                if part["video"].audio is not None:
                    audios.append(part["video"].audio)
                    slots.append(len(videos))
                videos.append(part["video"])

    kwargs: dict = {"return_tensors": "pt"}
    with_track = [i for i, v in enumerate(videos) if v.audio is not None]
    if with_track and len(with_track) != len(videos):
        raise InvalidInput("either every video in the conversation has an audio track or none has: the reference "
                           "model's use_audio_in_video applies to the whole request")
    if videos:
        fps = _shared_fps([videos[i] for i in with_track])
        kwargs["videos_kwargs"] = {"do_sample_frames": False, "cap_pixels_per_frame": True}
        if fps is not None:
            kwargs["videos_kwargs"]["fps"] = fps
    if with_track:
        kwargs.update(load_audio_from_video=True, audio_from_video_indices=slots)

    out = dict(processor(
        text=prompt, audio=audios or None, images=images or None,
        videos=[v.frames for v in videos] or None, **kwargs,
    ))
    if videos:
        patch = processor.video_processor.temporal_patch_size
        default_fps = kwargs["videos_kwargs"].get("fps", 1.0)  # the processor's default when none is given
        out["video_second_per_grid"] = torch.tensor([patch / (v.fps or default_fps) for v in videos])
    if with_track:
        out["use_audio_in_video"] = True
    return out


def _shared_fps(videos: list[VideoInput]) -> float | None:
    """The one frame rate the processor interleaves video with its audio at (single frames fit any rate)."""
    rates = [v.fps for v in videos if v.fps is not None]
    if any(not math.isclose(r, rates[0], rel_tol=1e-3) for r in rates):
        raise InvalidInput(f"videos with audio tracks must share one frame rate, got {sorted(set(rates))} fps: "
                           "the processor interleaves audio and video at a single rate")
    return rates[0] if rates else None


def processed_pixels(processor, kind: str) -> int | None:
    """The most pixels the processor resizes an image ("image") or a video frame ("video") to; None if unknown."""
    size = getattr(getattr(processor, f"{kind}_processor", None), "size", None)
    return getattr(size, "longest_edge", None) or (size.get("longest_edge") if isinstance(size, Mapping) else None)


def _load_media(message: dict, where: str, processor) -> dict:
    if isinstance(message["content"], str):
        return message
    return {**message, "content": [_load_part(part, f"{where}.content[{j}]", processor)
                                   for j, part in enumerate(message["content"])]}


def _load_part(part: dict, at: str, processor) -> dict:
    """A validated part with its media decoded (AudioInput, RGB PIL image, VideoInput); text as it is. Media given
    as bytes are decoded once per process (media_cache): a session's history comes back as the client's bytes on
    every turn."""
    kind = part["type"]
    if kind == "audio":
        source, rate = part["audio"], part.get("sample_rate")
        return {"type": "audio", "audio": HISTORY.get("audio", source, {"rate": rate}, lambda: _located(
            at, decode_audio, source, rate))}
    if kind == "image":
        source, target = part["image"], processed_pixels(processor, "image")
        return {"type": "image", "image": HISTORY.get("image", source, {"target": target}, lambda: _located(
            at, load_image, source, target_pixels=target))}
    if kind == "video" and not isinstance(part["video"], VideoInput):
        source, target = part["video"], processed_pixels(processor, "video")
        return {"type": "video", "video": HISTORY.get("video", source, {"target": target}, lambda: _located(
            at, lambda v: load_video(**v, target_pixels=target), source))}
    return part


def _located(where: str, fn, *args, **kwargs):
    """Call a loader; prefix its domain error with where the bad input sits."""
    try:
        return fn(*args, **kwargs)
    except (InvalidInput, ResourceExhausted) as e:
        raise type(e)(f"{where}: {e}") from e
