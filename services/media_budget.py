"""A turn's budget of decoded media, charged from the files' headers before anything is decoded.

Small uploads can decode to huge arrays: a 49 KB PNG of 7070x7070 pixels is 150 MB as RGB and about 600 MB once the
processor holds it as floats; a few KB of FLAC can hold an hour of silence. The per-turn byte limit
(`max_request_bytes`) cannot see that, so the gateway also charges every image, video frame and audio of a turn
against two budgets and refuses the turn with RESOURCE_EXHAUSTED, naming the input, before decoding any of it:

- pixels (images and video frames together), counted at the size they will be decoded at: a JPEG of 4x the
  processor's largest size or more decodes at 1/2, 1/4 or 1/8 scale (`preprocess.draft_for`); other formats decode
  at full size, so they count at full size;
- audio samples as decoded (frames x channels, at the file's own rate): a WAV/FLAC/OGG header gives its length,
  PCM its byte count.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import ResourceExhausted
from services.preprocess import draft_for, open_audio_file, open_image, processed_pixels

# About three images at Qwen3-Omni's largest processed size (12.8 MP): ~120 MB as RGB, ~500 MB at the processor.
DEFAULT_MAX_DECODED_PIXELS = 40_000_000
# 20 minutes of 48 kHz mono: 230 MB as the float32 the decoder reads.
DEFAULT_MAX_DECODED_SAMPLES = 20 * 60 * 48_000


@dataclass
class MediaBudget:
    """What one turn may decode; `charge_*` adds an input's cost and raises once the turn's total passes a limit."""

    max_pixels: int = DEFAULT_MAX_DECODED_PIXELS
    max_samples: int = DEFAULT_MAX_DECODED_SAMPLES
    image_target: int | None = None  # the processor's largest image, in pixels (decode no bigger than needed)
    frame_target: int | None = None  # the same for a video frame
    pixels: int = 0
    samples: int = 0

    @classmethod
    def for_processor(cls, processor, max_pixels: int = DEFAULT_MAX_DECODED_PIXELS,
                      max_samples: int = DEFAULT_MAX_DECODED_SAMPLES) -> MediaBudget:
        return cls(max_pixels, max_samples, processed_pixels(processor, "image"), processed_pixels(processor, "video"))

    def charge_image(self, where: str, data: bytes, *, frame: bool = False) -> None:
        """An encoded image or video frame: its size from the header, reduced as `load_image` will decode it."""
        image = open_image(data)
        draft_for(image, self.frame_target if frame else self.image_target)
        width, height = image.size  # after draft: the JPEG's decoded size
        image.close()
        self.pixels += width * height
        if self.pixels > self.max_pixels:
            raise ResourceExhausted(
                f"{where} decodes to {width}x{height} = {width * height:,} pixels, which takes the turn's images and "
                f"video frames past their budget of {self.max_pixels:,} decoded pixels (the gateway's "
                "max_decoded_pixels); send smaller images or fewer frames")

    def charge_audio_file(self, where: str, data: bytes) -> None:
        """An encoded audio file (WAV, FLAC, OGG): its length from the header."""
        with open_audio_file(data) as f:
            frames, channels, rate = f.frames, f.channels, f.samplerate
        self._charge_samples(where, frames, channels, rate)

    def charge_pcm(self, where: str, nbytes: int, channels: int, rate: int) -> None:
        """Raw PCM16: its length from the byte count."""
        self._charge_samples(where, nbytes // (2 * max(channels, 1)), max(channels, 1), rate)

    def _charge_samples(self, where: str, frames: int, channels: int, rate: int) -> None:
        samples = frames * channels
        self.samples += samples
        if self.samples > self.max_samples:
            length = f"{frames / rate:.1f} s at {rate} Hz x {channels} channel(s)" if rate > 0 else f"{frames} frames"
            raise ResourceExhausted(
                f"{where} is {length} = {samples:,} samples, which takes the turn's audio past its budget of "
                f"{self.max_samples:,} decoded samples (the gateway's max_decoded_samples, "
                f"{self.max_samples / 48_000 / 60:.0f} min at 48 kHz mono); send shorter audio")
