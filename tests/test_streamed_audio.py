"""Audio that grows while a turn streams in, preprocessed once per piece: PCM resampled as it arrives
(`preprocess.PcmStream`) and log-mel frames computed once (`log_mel.LogMelExtractor`), each bit-equal to the
whole-audio computation it replaces (the reference's inputs must not change)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from services.errors import InvalidInput, ResourceExhausted
from services.log_mel import MIN_WIDTH, LogMelExtractor, LogMelFrames
from services.preprocess import PcmStream, build_turn, decode_audio, load_processor
from services.turn_parts import audio_part, text_part


def speechlike(seconds: float, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    """PCM16 with syllables of tones and noise between stretches of digital silence (the log-mel clamp's case)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    envelope = (np.sin(2 * np.pi * 3 * t) > 0.2) * (0.2 + 0.6 * rng.random())
    x = envelope * (np.sin(2 * np.pi * 220 * t * (1 + 0.1 * np.sin(t))) + 0.1 * rng.standard_normal(n))
    pcm = (np.clip(x, -1, 1) * 32000).astype(np.int16)
    return np.stack([pcm, pcm // 2], axis=1) if channels == 2 else pcm


@pytest.mark.parametrize("rate, channels", [(16000, 1), (22050, 1), (44100, 2), (48000, 1), (8000, 1)])
def test_pcm_resampled_as_it_arrives_equals_the_whole_decode(rate, channels):
    pcm = speechlike(5.3, rate, channels)
    data = pcm.tobytes()
    stream = PcmStream(rate, channels)
    rng = np.random.default_rng(1)
    got, at, views = bytearray(), 0, []
    while at < len(data):
        step = int(rng.integers(1, 9000))  # any bytes: half samples, odd frames
        got += data[at:at + step]
        at += step
        if rng.random() < 0.3:
            stream.feed(got[:int(rng.integers(0, len(got) + 1))])  # a live view's prefix, fed from its thread
        else:
            stream.feed(got)
        views.append((view := stream.so_far(), view.copy()))
    decoded = stream.decode(got)
    whole = decode_audio(pcm, rate)
    assert np.array_equal(decoded.samples, whole.samples) and decoded.source_rate == whole.source_rate == rate
    # What was decoded so far is a prefix of the whole, and no later write (or growth of the buffer) changed it.
    assert all(np.array_equal(view, copy) and np.array_equal(view, whole.samples[:len(view)])
               for view, copy in views)
    assert len(views[-1][0]) > len(whole.samples) * 0.9 and not views[-1][0].flags.writeable
    assert stream.decode(got) is decoded  # once
    with pytest.raises(RuntimeError, match="decoded before its last chunk"):
        stream.feed(got + b"\0\0" * channels)


def test_a_turns_own_pcm_is_stored_as_a_read_only_view_of_its_bytes():
    """At end_of_turn the PCM's stored form (the session history's) views the turn's bytes, which nothing appends
    to any more: no copy of them at the end (5 ms for 10 minutes). A live prefill's copy of a prefix owns its bytes."""
    from services.gateway import _Audio

    pcm = speechlike(2.0, 22050)
    audio = _Audio("pcm16", 22050, 1, "", bytearray(pcm.tobytes()), stream=PcmStream(22050, 1))
    live = dataclasses.replace(audio, data=audio.data[:20000], view=True)
    for part, shares in ((live, False), (audio, True)):
        raw, decoded = part.decode()
        assert np.shares_memory(raw["audio"], np.frombuffer(audio.data, np.uint8)) == shares
        assert not raw["audio"].flags.writeable and np.array_equal(raw["audio"], pcm[:len(raw["audio"])])
    assert np.array_equal(decoded.samples, decode_audio(pcm, 22050).samples)


def test_pcm_stream_limits_are_decode_audios():
    with pytest.raises(InvalidInput, match="sample rate"):
        PcmStream(10, 1)
    with pytest.raises(InvalidInput, match="empty"):
        PcmStream(16000, 1).decode(b"")
    with pytest.raises(InvalidInput, match="too short"):
        PcmStream(16000, 1).decode(b"\0\0" * 100)
    with pytest.raises(ResourceExhausted, match="the limit is 1 s"):
        PcmStream(16000, 1).decode(b"\0\0" * 20000, max_seconds=1)


@pytest.fixture
def extractors():
    plain = WhisperFeatureExtractor(feature_size=128)
    return plain, LogMelExtractor.of(plain)


def features(extractor, *audios: np.ndarray) -> np.ndarray:
    """As the processor calls it: every audio of the conversation in one padded batch."""
    return extractor(list(audios), sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
                     return_tensors="np")["input_features"]


def test_log_mel_of_growing_audio_equals_the_whole_computation_and_computes_each_frame_once(extractors):
    plain, cached = extractors
    audio = decode_audio(speechlike(30.0, 16000), 16000).samples
    louder = audio.copy()
    louder[25 * 16000:] *= 3.0  # a louder end raises the clamp of every earlier quiet frame
    frames = cached.frames
    for end in (201, 400, 8.1 * 16000, 16.1 * 16000, 24.1 * 16000, 30 * 16000):
        part = audio[:int(end)]
        before = frames.frames_computed
        assert np.array_equal(features(cached, part), features(plain, part)), end
        if end > 8.1 * 16000:  # only the frames past the last call's (and its reflected end) were computed
            assert frames.frames_computed - before < 8.1 * 100
    reused = frames.frames_reused
    assert np.array_equal(features(cached, louder), features(plain, louder))
    changed = int(np.flatnonzero(louder != audio)[0])  # (digital silence stays silence)
    assert frames.frames_reused - reused == (changed - 200) // 160 + 1  # the frames before the first change
    # Frame 0 reflects samples 1 .. 200 (a change at 200 changes it), frame 1 samples 1 .. 40; then no reflection.
    frames.key_samples = 16  # a change past them finds the entry
    for at, stable in ((200, 0), (300, 1), (360, 2), (1000, 6)):
        edge = audio[16000:32000].copy()
        features(cached, edge)
        changed = edge.copy()
        changed[at] += 0.5
        assert frames.stable_frames(edge, changed) == stable, at
        before = frames.frames_reused
        assert np.array_equal(features(cached, changed), features(plain, changed)), at
        assert frames.frames_reused - before == stable, at
    # The mel matmul is at least MIN_WIDTH frames wide: a change near the end recomputes that many.
    edge = audio[16000:32000].copy()
    features(cached, edge)
    edge[-10] += 0.5
    before = frames.frames_reused
    assert np.array_equal(features(cached, edge), features(plain, edge))
    assert frames.frames_reused - before == 16000 // 160 - MIN_WIDTH


def test_a_streams_frames_and_features_are_reused_without_comparing_its_samples(extractors, monkeypatch):
    """A stream's warm-ups (`so_far`) and its decode view one buffer: the frames of what they share are reused
    without a sample-by-sample compare (1 ms at 120 s, 4 ms at 10 min), also beside the copies live prefills keep,
    and so are their features while the maximum is the same; the features stay the parent's."""
    plain, cached = extractors
    pcm = speechlike(10.0, 16000).tobytes()  # the buffer last grows at 7.6 s (by half): the end shares it
    stream, got = PcmStream(16000, 1), bytearray()
    for at in range(0, len(pcm), 3200):  # 100 ms chunks, a warm-up every second
        got += pcm[at:at + 3200]
        stream.feed(got)
        if at % 32000 == 0 and len(stream.so_far()) > 16000:
            cached.warm(stream.so_far())
            if at in (96000, 192000):
                # A live prefill's decode: a copy, kept beside the warm-ups (as when it raced the next one for the
                # same base, which each replaces).
                keep = cached.frames._keep
                with monkeypatch.context() as m:
                    m.setattr(cached.frames, "_keep", lambda key, seen, _base: keep(key, seen, None))
                    features(cached, stream.so_far().copy())
    decoded = stream.decode(got).samples
    compared = []
    real = np.flatnonzero
    monkeypatch.setattr(np, "flatnonzero", lambda a: compared.append(len(a)) or real(a))
    frames = cached.frames
    reused, scaled = frames.frames_reused, frames.features_reused
    assert np.array_equal(features(cached, decoded), features(plain, decoded))
    assert frames.frames_reused - reused > 800 and not compared  # (the parent compares nothing)
    assert frames.features_reused - scaled == frames.frames_reused - reused  # the same maximum
    copy = decoded.copy()  # equal samples elsewhere in memory: compared, and reused as well
    assert np.array_equal(features(cached, copy), features(plain, copy)) and compared
    louder = decoded.copy()
    louder[-16000:] *= 4.0  # a louder last second raises the clamp of every frame: no features are copied
    assert not np.array_equal(louder, decoded)  # (its last 0.1 s is digital silence)
    reused, scaled = frames.frames_reused, frames.features_reused
    assert np.array_equal(features(cached, louder), features(plain, louder))
    assert frames.frames_reused - reused > 800 and frames.features_reused == scaled


def test_a_streams_end_grows_the_storage_of_its_warm_ups_and_what_a_caller_holds_never_changes(extractors):
    """A stream's warm-ups and its end grow one storage in place (the end of a long turn copies none of the frames
    before it); a live prefill's output, which its caller holds, is never written again, though the stream's
    next warm-ups extend the frames it ends with."""
    plain, cached = extractors
    frames = cached.frames
    pcm = speechlike(10.0, 16000).tobytes()  # within the room the first warm-up leaves
    stream, got, held = PcmStream(16000, 1), bytearray(), []
    for at in range(0, len(pcm), 3200):  # 100 ms chunks, a warm-up every second
        got += pcm[at:at + 3200]
        stream.feed(got)
        if at % 32000 == 0 and len(stream.so_far()) > 16000:
            grown = frames.grown_in_place
            cached.warm(stream.so_far())
            assert frames.grown_in_place == grown + (len(stream.so_far()) > 32000), at  # after the first one
            if at in (96000, 224000):  # a live prefill's own decode (read-only), as the gateway's
                copy = stream.so_far().copy()
                copy.flags.writeable = False
                out = features(cached, copy)
                assert np.array_equal(out, features(plain, copy))
                held.append((out, out.copy()))
    decoded = stream.decode(got).samples
    grown, copied = frames.grown_in_place, frames.features_reused
    end = features(cached, decoded)
    assert np.array_equal(end, features(plain, decoded))
    held.append((end, end.copy()))
    assert frames.grown_in_place == grown + 1 and frames.features_reused > copied
    for out, before in held:
        assert np.array_equal(out, before)
    # The same audio again (a session's history, rendered every turn; here also a copy elsewhere in memory): its
    # features as they are, nothing computed or copied.
    computed = frames.frames_computed
    for again in (decoded, decoded.copy()):
        ours = features(cached, again)
        assert np.shares_memory(ours, end) and np.array_equal(ours, features(plain, again))
    assert frames.frames_computed == computed
    for out, before in held:
        assert np.array_equal(out, before)


def test_fills_that_race_over_one_stream_give_the_parents_features_and_never_change_them(extractors):
    """Warm-ups, live prefills' copies and the end of one stream, each on its own thread and racing for the storage
    they extend (`LogMelFrames._claim`): every output is the parent's, and stays so after all of them are done."""
    plain, cached = extractors
    pcm = speechlike(12.0, 16000, seed=9).tobytes()
    stream, got, held, threads = PcmStream(16000, 1), bytearray(), [], []

    def live(audio):
        out = features(cached, audio)
        held.append((out, out.copy(), audio))

    def start(target, *args):
        threads.append(threading.Thread(target=target, args=args))
        threads[-1].start()

    for at in range(0, len(pcm), 3200):
        got += pcm[at:at + 3200]
        stream.feed(got)
        if at % 16000 == 0 and len(stream.so_far()) > 16000:  # a warm-up every half second, a live prefill often
            start(cached.warm, stream.so_far())
            if at % 48000 == 0:
                copy = stream.so_far().copy()
                copy.flags.writeable = False
                start(live, copy)
    decoded = stream.decode(got).samples
    start(live, decoded)
    start(live, decoded.copy())
    for thread in threads:
        thread.join()
    assert len(held) >= 8 and cached.frames.grown_in_place > 0
    for out, before, audio in held:
        assert np.array_equal(out, before) and np.array_equal(out, features(plain, audio))


def test_log_mel_of_a_batch_of_audios_equals_the_whole_computation(extractors):
    """A session's turn: the history's audio (seen before, now padded to the longest) and a new one."""
    plain, cached = extractors
    history = decode_audio(speechlike(3.0, 16000, seed=2), 16000).samples
    new = decode_audio(speechlike(7.5, 16000, seed=3), 16000).samples
    features(cached, history)
    assert np.array_equal(features(cached, history, new), features(plain, history, new))
    assert np.array_equal(features(cached, new, history), features(plain, new, history))


@pytest.mark.parametrize("tensors", ["pt", "np"])
def test_the_processors_call_gives_the_parents_outputs_without_copying_decoded_audio(extractors, tensors):
    """The processor's call (mono float32 audios, padded to the longest) skips the parent's copies; its features
    and mask are the parent's, also for lengths that are not whole frames."""
    plain, cached = extractors
    one = decode_audio(speechlike(2.0, 16000, seed=6)[:32037], 16000).samples  # read-only: decoded audio
    two = decode_audio(speechlike(1.0, 16000, seed=7)[:15999], 16000).samples
    assert not one.flags.writeable
    kwargs = dict(sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
                  return_tensors=tensors)
    cached([one], **kwargs)
    kept = [seen.samples for group in cached.frames._seen.values() for seen in group]
    assert any(np.shares_memory(samples, one) for samples in kept)  # kept as it is, not copied
    for audios in ([one], [two, one], [one, two], [one.copy()]):
        ours, theirs = cached(audios, **kwargs), plain(audios, **kwargs)
        assert ours.keys() == theirs.keys() == {"input_features", "attention_mask"}
        for key in theirs:
            assert type(ours[key]) is type(theirs[key]) and ours[key].dtype == theirs[key].dtype, key
            assert np.array_equal(np.asarray(ours[key]), np.asarray(theirs[key])), (key, [len(a) for a in audios])


def test_the_frames_kept_are_bounded_in_bytes():
    plain = WhisperFeatureExtractor(feature_size=128)
    cached = LogMelExtractor.of(plain)
    cached.frames = LogMelFrames(cached.n_fft, cached.hop_length, cached.mel_filters, max_bytes=2 * 2**20)
    for seed in range(6):  # ~1 MB each: 2 s of samples and their frames
        audio = decode_audio(speechlike(2.0, 16000, seed=seed), 16000).samples
        assert np.array_equal(features(cached, audio), features(plain, audio))
    assert 0 < cached.frames.nbytes <= 2 * 2**20


def test_the_served_processor_gives_the_plain_processors_outputs(tiny_ckpt, processor):
    served = load_processor(tiny_ckpt)
    assert isinstance(served.feature_extractor, LogMelExtractor)
    parts = [text_part("Two sounds: "), audio_part(speechlike(9.0, 16000, seed=4), sample_rate=16000),
             text_part(" and "), audio_part(speechlike(2.0, 16000, seed=5), sample_rate=16000)]
    for _ in range(2):  # the second time from the frames it kept
        ours, theirs = (build_turn(p, parts=parts).processor_outputs for p in (served, processor))
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert np.array_equal(np.asarray(ours[key]), np.asarray(theirs[key])), key


def test_decoded_audio_is_read_only_and_never_the_callers_array(extractors):
    """The log-mel frames keep decoded audio as it is, so no one may write it: not the caller either."""
    _, cached = extractors
    theirs = np.random.default_rng(8).uniform(-0.5, 0.5, 16000).astype(np.float32)
    decoded = decode_audio(theirs, 16000).samples
    assert not decoded.flags.writeable and not np.shares_memory(decoded, theirs)
    assert theirs.flags.writeable  # their array is left as it was
    view = theirs.view()
    view.flags.writeable = False  # read-only, but its base is not: kept as a copy
    cached([view], sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True)
    kept = [seen.samples for group in cached.frames._seen.values() for seen in group]
    assert kept and not any(np.shares_memory(samples, theirs) for samples in kept)
