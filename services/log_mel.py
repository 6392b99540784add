"""Whisper's log-mel features, computed once per STFT frame of audio that grows (live input) or comes again (a
session's history).

A turn whose audio streams in is rendered again at every live prefill and at its end (`services.live_input`), and
the processor computes the features of the whole audio each time: 30 ms for 120 s here, 130 ms for 10 minutes,
all of it at the end of the turn. Yet a frame's log-mel before the clamp depends only on its own 400 samples (the
first frames also on the reflected start), so `LogMelExtractor` keeps those frames for the audios it saw lately and
computes only the frames past the longest prefix of samples a new audio shares with one of them (compared sample by
sample, unless both view one stream's buffer). What is input-wide is the clamp at "maximum minus 8": where the
maximum is the kept audio's too, the features of the frames they share are copied from it, else computed over the
whole audio as before. While an audio still streams in, `warm` computes its frames from what is decoded of it so
far, every second of it, so that the end of its turn computes those of about its last second. The frames and the
features are kept frame-major, in storage with room past them: each warm-up, and the end, grows its stream's in
place (`_Rows`), and the processor's output is a (transposed) view of it, so the end of a long turn copies none of
what came before.

The mel matmul computes at least `MIN_WIDTH` frames at once (all of a shorter audio, as the processor does): BLAS
rounds a matrix a few columns wide otherwise (its vector kernels), a wide one as the processor's one matmul over the
whole audio (tests/test_streamed_audio.py compares them).

    processor.feature_extractor = LogMelExtractor.of(processor.feature_extractor)   # `preprocess.load_processor`
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from transformers import BatchFeature, WhisperFeatureExtractor

MAX_BYTES = 256 * 2**20  # samples and frames kept per process
MIN_WIDTH = 64  # frames per mel matmul, at least
GROW_FRAMES = 1000  # room for 10 s more, at least, past an audio's frames (0.5 MB each of log-mel and features)


@dataclass(eq=False)
class _Rows:
    """Frame-major storage [capacity, n_mels] of one stream's frames (and [capacity] of their peaks), which the
    entry at its end (`tip`) leaves for the next fill that extends it to grow in place: the end of a long turn then
    copies none of the frames its warm-ups computed (its log-mel took 2.6 ms for 120 s, 10 ms for 10 minutes, with
    the copies; 0.9 and 1.1 ms without)."""

    log_mel: Tensor
    peaks: Tensor
    tip: _Seen | None = None

    @classmethod
    def empty(cls, frames: int, n_mels: int) -> "_Rows":
        return cls(torch.empty(_room(frames), n_mels), torch.empty(_room(frames)))


@dataclass(eq=False)
class _Seen:
    samples: np.ndarray  # [L] float32, the audio the frames were computed from (not written after)
    rows: _Rows  # its frames are rows [:frames]: log10(max(mel, 1e-10)) before the clamp, and each one's maximum
    frames: int  # L // hop: every frame but the last, as the extractor uses them
    stable: int  # its first frames whose samples all lie in `samples` (past them, the reflected end)
    # [frames, n_mels] the extractor's output (transposed), rows of storage that may hold room past them; None for
    # a copy's; `given`: returned to a caller, so no one writes those rows again
    features: Tensor | None = None
    given: bool = False
    peak: Tensor | None = None  # the maximum its features were clamped at (its peaks' rows may be grown over)

    @property
    def log_mel(self) -> Tensor:
        return self.rows.log_mel[:self.frames]

    @property
    def peaks(self) -> Tensor:
        return self.rows.peaks[:self.frames]

    @property
    def nbytes(self) -> int:  # storage, room included (shared storage counted for each: an upper bound)
        tensors = (self.rows.log_mel, self.rows.peaks) + ((self.features,) if self.features is not None else ())
        return self.samples.nbytes + sum(t.untyped_storage().nbytes() for t in tensors)


class LogMelFrames:
    """Log-mel frames (before the clamp) of audios seen lately, by content; bounded in bytes, least recently used
    out first. Thread-safe: the processor runs in worker threads."""

    def __init__(self, n_fft: int, hop: int, mel_filters: np.ndarray, max_bytes: int = MAX_BYTES,
                 key_samples: int = 1024):
        self.n_fft, self.hop, self.max_bytes = n_fft, hop, max_bytes
        self.mel_filters = torch.from_numpy(mel_filters).to(torch.float32)  # [n_fft // 2 + 1, n_mels]
        self.n_mels = self.mel_filters.shape[1]
        self.key_samples = key_samples  # an entry's key: its first samples (a candidate is then compared in full)
        self.window = torch.hann_window(n_fft)
        self.frames_reused = self.frames_computed = 0
        self.features_reused = 0  # frames whose features were copied (`_scale`)
        self.grown_in_place = 0  # fills that extended their base's storage (`_Rows`) rather than copying it
        self._seen: OrderedDict[bytes, list[_Seen]] = OrderedDict()
        self._lock = threading.Lock()

    def fill(self, samples: np.ndarray, keep_views: bool = False, give: bool = True) -> Tensor:
        """The extractor's output [n_mels, L // hop] for `samples` [L]: the log-mel frames (torch.stft: centered,
        reflect-padded, Hann; every frame but the last, as the extractor uses them), Whisper's clamp at their
        maximum minus 8, and scaling. The frames are kept; with `keep_views`, `samples` and the output are kept
        as they are (no one writes them after), and the output may view kept storage (read it only). `give`: the
        caller keeps the output (a warm-up does not)."""
        frames = len(samples) // self.hop
        key = samples[:self.key_samples].tobytes()
        with self._lock:
            candidates = list(self._seen.get(key, ()))
        first = shared = 0
        base = None
        cap = frames - MIN_WIDTH
        # The stream's own buffer first (no compare), then the longest: an entry no longer than the best so far is
        # not compared (live prefills' copies, each as long as the audio: 5 ms apiece for 10 minutes).
        for seen in sorted(candidates, key=lambda c: (not _same_memory(c.samples, samples), -c.frames)):
            if min(seen.frames, cap) <= first:
                continue
            n = self.stable_frames(seen.samples, samples)
            if n == frames == seen.frames and (again := self._again(key, seen, give)) is not None:
                return again
            if min(n, seen.frames, cap) > first:
                first, shared, base = min(n, seen.frames, cap), n, seen
        # In place: past `first`, the base's rows are recomputed from the same samples (the same bits) up to its
        # stable frames, and written new past them, its reflected end, which no other fill reads.
        in_place = self._claim(base, shared) and base.rows.log_mel.shape[0] >= frames
        if in_place:
            rows = base.rows
            self.grown_in_place += 1
        else:
            rows = _Rows.empty(frames, self.n_mels)
            if base is not None:
                rows.log_mel[:first], rows.peaks[:first] = base.log_mel[:first], base.peaks[:first]
        computed = self._compute(samples, first, frames)  # [n_mels, frames - first]
        rows.log_mel[first:frames] = computed.T
        torch.amax(computed, dim=0, out=rows.peaks[first:frames])
        self.frames_reused += first
        self.frames_computed += frames - first
        kept = _Seen(samples, rows, frames, min(frames, self.whole_frames(len(samples))), given=give)
        self._scale(kept, base, first, in_place)
        features = kept.features.T
        if not keep_views:
            kept = _Seen(samples.copy(), rows, frames, kept.stable)  # its features are the caller's
        self._keep(key, kept, base)
        return features

    def _again(self, key: bytes, seen: _Seen, give: bool) -> Tensor | None:
        """The features of an audio seen before (a session's history, rendered again every turn), as they are kept,
        from now on never written again; None while a fill may be growing them."""
        with self._lock:
            if seen.features is None or not (seen.given or seen.rows.tip is seen):
                return None
            seen.given = seen.given or give
            if key in self._seen:
                self._seen.move_to_end(key)
        self.frames_reused += seen.frames
        self.features_reused += seen.frames
        return seen.features.T

    def _claim(self, base: _Seen | None, shared: int) -> bool:
        """Whether this fill may grow `base`'s storage in place: it shares all of the base's stable frames, and no
        other fill has grown it since (then the base is no longer its storage's tip)."""
        with self._lock:
            if base is None or shared < base.stable or base.rows.tip is not base:
                return False
            base.rows.tip = None  # this fill's until it keeps its entry
            return True

    def _scale(self, seen: _Seen, base: _Seen | None, first: int, in_place: bool) -> None:
        """`seen.features` = (max(log_mel, peak - 8) + 4) / 4 of its frames, `peak` their maximum, as the parent
        computes it. Where the base's first frames and peak are the same, so are its features there: kept (their
        rows grown in place, if no caller holds them) or copied."""
        peak = seen.peaks.max()
        if base is None or base.features is None or not torch.equal(base.peak, peak):
            first = 0
        room = 0 if base is None or base.features is None else base.features.untyped_storage().nbytes() // (
            self.n_mels * base.features.element_size())
        if first and in_place and not base.given and room >= seen.frames:
            features = base.features.as_strided((seen.frames, self.n_mels), (self.n_mels, 1))
            # Its rows up to the base's stable frames hold these values already (the same frames and peak), and a
            # fill on another thread may be copying them: rewritten in place (three ops) they would pass through
            # other values. Past them, the base's reflected end, no other fill reads.
            first = max(first, min(base.stable, seen.frames))
        else:
            features = torch.empty(_room(seen.frames), self.n_mels)[:seen.frames]
            if first:
                features[:first] = base.features[:first]
        self.features_reused += first
        rest = features[first:]
        torch.maximum(seen.log_mel[first:], peak - 8.0, out=rest)
        rest.add_(4.0).div_(4.0)
        seen.features, seen.peak = features, peak

    def _compute(self, samples: np.ndarray, first: int, frames: int) -> Tensor:
        """Frames [first, frames) from their samples, reflected at the end (and at the start for frames 0, 1)."""
        with warnings.catch_warnings():  # decoded audio is read-only; torch only reads it here
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(samples)
        half, at = self.n_fft // 2, first * self.hop
        if at >= half:
            padded = torch.nn.functional.pad(x[None, None, at - half:], (0, half), mode="reflect")[0, 0]
        else:
            padded = torch.nn.functional.pad(x[None, None], (half, half), mode="reflect")[0, 0, at:]
        stft = torch.stft(padded, self.n_fft, self.hop, window=self.window, center=False, return_complex=True)
        power = (stft[:, :frames - first].abs() ** 2).contiguous()
        return torch.clamp(self.mel_filters.T @ power, min=1e-10).log10()

    def stable_frames(self, old: np.ndarray, new: np.ndarray) -> int:
        """How many leading frames `old` and `new` share: frame i spans samples [i*hop - n_fft/2, i*hop + n_fft/2)
        (frame 0 reflects samples 1 .. n_fft/2), which must all lie before the first differing sample, hence before
        `old`'s end too; all of them if the two are equal (their reflected ends too)."""
        m = min(len(old), len(new))
        if _same_memory(old, new):
            # The same memory, so equal: a stream's warm-ups and its decode view one buffer (`PcmStream`). A kept
            # entry's samples are copies, or arrays no one writes after (`keep_views`), so still what its frames
            # came from.
            same = m
        else:
            differ = np.flatnonzero(old[:m] != new[:m])
            same = int(differ[0]) if differ.size else m
        if same == len(old) == len(new):
            return len(new) // self.hop
        return self.whole_frames(same)

    def whole_frames(self, samples: int) -> int:
        """The leading frames whose n_fft samples all lie in an audio's first `samples` (none reflected at its end)."""
        half = self.n_fft // 2
        return (samples - half) // self.hop + 1 if samples > half else 0

    def __deepcopy__(self, memo) -> "LogMelFrames":
        return self  # one cache however its extractor is copied (`to_dict` deep-copies)

    def __reduce__(self):  # pickled empty
        return LogMelFrames, (self.n_fft, self.hop, self.mel_filters.numpy(), self.max_bytes, self.key_samples)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(s.nbytes for group in self._seen.values() for s in group)

    def _keep(self, key: bytes, seen: _Seen, replaces: _Seen | None) -> None:
        with self._lock:
            entries = [s for s in self._seen.pop(key, []) if s is not replaces]  # the new one extends it
            self._seen[key] = [*entries, seen]
            seen.rows.tip = seen  # the next fill that extends it may grow its storage
            total = sum(s.nbytes for group in self._seen.values() for s in group)
            while total > self.max_bytes and self._seen:
                oldest = next(iter(self._seen))
                group = self._seen[oldest]
                total -= group.pop(0).nbytes
                if not group:
                    del self._seen[oldest]


class LogMelExtractor(WhisperFeatureExtractor):
    """`WhisperFeatureExtractor` whose frames come from `LogMelFrames`; its features equal the parent's
    (tests/test_streamed_audio.py compares them on growing, changing and batched audio)."""

    frames: LogMelFrames

    @classmethod
    def of(cls, extractor: WhisperFeatureExtractor) -> "LogMelExtractor":
        out = cls.from_dict(extractor.to_dict())
        out.frames = LogMelFrames(out.n_fft, out.hop_length, out.mel_filters)
        return out

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.pop("frames", None)
        return out

    def __call__(self, raw_speech, truncation: bool = True, pad_to_multiple_of: int | None = None,
                 return_tensors=None, return_attention_mask: bool | None = None, padding="max_length",
                 max_length: int | None = None, sampling_rate: int | None = None, do_normalize: bool | None = None,
                 device: str = "cpu", **kwargs) -> BatchFeature:
        """The processor's call (its audios, mono float32, padded to the longest, not truncated) without the
        parent's copies of every sample (4 ms for 120 s); any other call is the parent's."""
        simple = (isinstance(raw_speech, (list, tuple)) and len(raw_speech) > 0
                  and all(isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype == np.float32 for a in raw_speech)
                  and padding in (True, "longest") and not truncation and pad_to_multiple_of is None
                  and not do_normalize and return_attention_mask and sampling_rate == self.sampling_rate
                  and device == "cpu" and self.dither == 0.0)
        if not simple:
            return super().__call__(raw_speech, truncation=truncation, pad_to_multiple_of=pad_to_multiple_of,
                                    return_tensors=return_tensors, return_attention_mask=return_attention_mask,
                                    padding=padding, max_length=max_length, sampling_rate=sampling_rate,
                                    do_normalize=do_normalize, device=device, **kwargs)
        lengths = [len(a) for a in raw_speech]
        longest = max(lengths)
        if len(raw_speech) == 1:  # kept as it is if no one can write it (decoded audio: `preprocess.AudioInput`)
            rows = np.ascontiguousarray(raw_speech[0])[None]
            features = self._log_mel(rows, keep_views=_frozen(rows))
        else:  # zero-padded to the longest, as the parent's `pad`
            rows = np.zeros((len(raw_speech), longest), np.float32)
            for row, audio in zip(rows, raw_speech):
                row[:len(audio)] = audio
            features = self._log_mel(rows, keep_views=False)
        # The parent's mask: a frame is the audio's while its first sample is (every frame but the last).
        mask = np.zeros((len(lengths), longest // self.hop_length), np.int32)
        for row, length in zip(mask, lengths):
            row[:-(-length // self.hop_length)] = 1
        return BatchFeature({"input_features": features, "attention_mask": mask}, tensor_type=return_tensors)

    def warm(self, samples: np.ndarray) -> float | None:
        """Compute and keep the frames of an audio still arriving: `samples`, what is decoded of it so far, never
        written after (`PcmStream.so_far`). The call with the whole audio then computes only the frames past it
        (`services.live_input`). Its level: the largest feature of the frames that more audio leaves as they are
        (not its reflected end), which rises with the clamp; the same arithmetic as every call's, so levels compare
        exactly. None: too short to warm."""
        frames = len(samples) // self.hop_length
        if frames <= MIN_WIDTH:
            return None
        features = self.frames.fill(samples, keep_views=True, give=False)
        return float(features[:, :self.frames.whole_frames(len(samples))].max())

    def _torch_extract_fbank_features(self, waveform: np.ndarray, device: str = "cpu") -> np.ndarray:
        if self.dither != 0.0 or device != "cpu" or waveform.ndim != 2:
            return super()._torch_extract_fbank_features(waveform, device)
        # The parent's padded copy of one audio: no one else holds it.
        return self._log_mel(np.asarray(waveform, dtype=np.float32), keep_views=len(waveform) == 1)

    def _log_mel(self, rows: np.ndarray, keep_views: bool) -> np.ndarray:
        """Each row's features, the parent's arithmetic over its log-mel frames (`LogMelFrames.fill`). One audio's
        are returned as they are kept (a transposed view): the conductor and the encoders only read the processor's
        outputs."""
        if len(rows) == 1:
            return self.frames.fill(np.ascontiguousarray(rows[0]), keep_views=keep_views)[None].numpy()
        features = torch.empty(rows.shape[0], self.feature_size, rows.shape[1] // self.hop_length)
        for row, out in zip(rows, features):
            out.copy_(self.frames.fill(np.ascontiguousarray(row), keep_views=keep_views))
        return features.numpy()


def _room(frames: int) -> int:
    """Rows to allocate for `frames`: a stream grows, by a warm-up's second at a time, to its end."""
    return frames + max(frames // 2, GROW_FRAMES)


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return a.ctypes.data == b.ctypes.data and a.strides == b.strides


def _frozen(a: np.ndarray) -> bool:
    """No one can write `a`'s memory: it and every array it views are read-only (or it views bytes)."""
    while isinstance(a, np.ndarray):
        if a.flags.writeable:
            return False
        a = a.base
    return a is None or isinstance(a, bytes)
