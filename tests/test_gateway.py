"""The Omni API over real gRPC (a grpc.aio server on loopback, in-process stages): `omni chat` equals
`omni generate` (token ids, codes, WAV samples) for text, audio, image and video input and a two-turn session;
concurrent streams; bad input ends with the right status and the server keeps serving."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import socket
import threading
import time

import grpc
import numpy as np
import PIL.Image
import PIL.ImageFile
import psutil
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import ConverseError, OmniClient, Video
from services.conductor import Conductor, TurnRequest
from services.engines.bundle import Engines
from services.errors import InvalidInput, OmniError
from services.events import AudioChunk, TextDelta, TurnSummary, float_to_pcm16
from services.gateway import OmniServicer, start_gateway
from services.generate import add_generate_arguments
from services.preprocess import load_image, load_video
from services.remote import RemoteThinker
from services.sessions import InProcessSessions
from services.stages import Stages
from services.turn_parts import text_part, video_part
from services.wire.gen.omni.v1 import common_pb2, omni_pb2, omni_pb2_grpc
from services.wire.server import MAX_MESSAGE_BYTES
from tests.api_contract import (
    INPUTS,
    SHORT,
    assert_same,
    chat,
    check_chat_equals_generate,
    check_four_concurrent_streams,
    check_two_turn_session,
    collect,
    generate,
    parse,
)
from tests.helpers import LoopThread, assert_rejected_for_size
from tests.test_conductor import reference_run

MAX_REQUEST_BYTES = 2 << 20  # small, so the per-turn cap is cheap to hit


@pytest.fixture(scope="module")
def stages(tiny_ckpt):
    return Stages.local(Engines.load(tiny_ckpt))


@pytest.fixture(scope="module")
def gateway(stages):
    """(address, servicer) of a running gateway with health and reflection."""
    loop = LoopThread()
    servicer = OmniServicer(stages, InProcessSessions(), max_request_bytes=MAX_REQUEST_BYTES, default_deadline_s=120)
    server, port = loop.run(start_gateway(servicer))
    yield f"127.0.0.1:{port}", servicer
    loop.run(server.stop(None))
    loop.stop()


@pytest.mark.parametrize("inputs", INPUTS.values(), ids=INPUTS.keys())
def test_chat_equals_generate(gateway, stages, media, tmp_path, inputs):
    check_chat_equals_generate(gateway[0], stages, media, tmp_path, inputs)


def test_two_turn_session_equals_generate_with_conversation(gateway, stages, media, tmp_path, capsys):
    turn1 = check_two_turn_session(gateway[0], stages, media, tmp_path, "s-two-turns")
    assert turn1["text"] + "\n" in capsys.readouterr().out  # omni chat prints the text as it streams


def test_four_concurrent_streams_each_equal_their_single_run(gateway, media):
    check_four_concurrent_streams(gateway[0], media)


def test_health_and_streamed_events(gateway):
    async def go():
        async with grpc.aio.insecure_channel(gateway[0]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(service="omni.v1.Omni"))
            async with OmniClient(gateway[0]) as client:
                turn = client.converse(text="Hi.", greedy=True, max_new_tokens=8, max_audio_frames=20,
                                       request_id="req-1", session_id="")
                return status.status, turn, [e async for e in turn]

    status, turn, events = asyncio.run(go())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert turn.request_id == "req-1"
    summary = events[-1]
    assert isinstance(summary, TurnSummary) and summary.finish_reason in ("stop", "length")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == summary.text
    chunks = [e for e in events if isinstance(e, AudioChunk)]
    assert [c.seq for c in chunks] == list(range(len(chunks))) and chunks[0].sample_rate == 24000
    assert summary.timings["time_to_first_audio_s"] > 0


# ---- bad input ------------------------------------------------------------------------------------------------


def assert_serving(address: str) -> None:
    summary, _ = OmniClient(address).converse_sync(text="Still there?", greedy=True, audio_output=False,
                                                   max_new_tokens=3)
    assert len(summary.thinker_token_ids) == 3


async def raw_converse(address: str, requests: list, **channel_kwargs) -> grpc.aio.AioRpcError:
    """Send messages as given on a plain stub; the call's error."""
    async with grpc.aio.insecure_channel(address, **channel_kwargs) as channel:
        call = omni_pb2_grpc.OmniStub(channel).Converse(iter(requests), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        return info.value


def config(**kw) -> omni_pb2.ConverseRequest:
    return omni_pb2.ConverseRequest(config=omni_pb2.ConverseConfig(**kw))


END = omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn())


@pytest.mark.parametrize("requests, code, message", [
    # A rejected first message ends the call at once (clients send parts after TurnStarted): nothing follows it.
    ([omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="hi"))],
     grpc.StatusCode.INVALID_ARGUMENT, "the first message must be config"),
    ([config(speaker="nobody")], grpc.StatusCode.INVALID_ARGUMENT, "unknown speaker 'nobody'"),
    ([config(talker_style="whisper")], grpc.StatusCode.INVALID_ARGUMENT, "talker_style"),
    ([config(), omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(pcm16=b"\0\0" * 800, sample_rate=7)), END],
     grpc.StatusCode.INVALID_ARGUMENT, "sample rate 7 Hz is outside"),
    ([config(), omni_pb2.ConverseRequest(image=omni_pb2.ImageInput(data=b"\x89PNG\r\n\x1a\n broken")), END],
     grpc.StatusCode.INVALID_ARGUMENT, "not a readable image"),
    ([config(), END], grpc.StatusCode.INVALID_ARGUMENT, "empty turn"),
    ([config(), omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="no commit"))],
     grpc.StatusCode.INVALID_ARGUMENT, "ended before end_of_turn"),
    ([config(), config(), END], grpc.StatusCode.INVALID_ARGUMENT, "config must be sent once"),
    # Three 1 MiB chunks pass the per-message limit but not the turn's 2 MiB.
    ([config(), *[omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(pcm16=bytes(1 << 20), sample_rate=16000))] * 3,
      END], grpc.StatusCode.RESOURCE_EXHAUSTED, "limit"),
], ids=["no-config", "unknown-speaker", "talker-style", "bogus-sample-rate", "corrupt-image", "empty-turn",
        "no-end-of-turn", "second-config", "turn-over-limit"])
def test_bad_input_is_a_clear_status_and_the_server_keeps_serving(gateway, requests, code, message):
    error = asyncio.run(raw_converse(gateway[0], requests))
    assert error.code() == code and message in error.details(), (error.code(), error.details())
    assert_serving(gateway[0])


def test_a_message_over_the_receive_limit_is_rejected_by_grpc(gateway):
    """The mechanism that rejects a 500 MB message: the server's max receive size. The client's own send limit is
    lifted so that the message really reaches the server."""
    big = omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(encoded=bytes(MAX_MESSAGE_BYTES + 1)))
    error = asyncio.run(raw_converse(gateway[0], [config(), big],
                                     options=[("grpc.max_send_message_length", -1)]))
    assert_rejected_for_size(error)
    assert_serving(gateway[0])


def test_the_client_refuses_a_video_frame_over_the_message_limit():
    frame = bytes(MAX_MESSAGE_BYTES)
    with pytest.raises(InvalidInput, match=r"parts\[0\] video frame 1: 8388608 bytes"):
        OmniClient("127.0.0.1:1").converse(text="hi", videos=[Video(frames=[b"x", frame], timestamps=[0.0, 0.5])])


def test_unknown_speaker_through_the_client_library(gateway):
    with pytest.raises(ConverseError, match="INVALID_ARGUMENT: unknown speaker 'bob'") as info:
        OmniClient(gateway[0]).converse_sync(text="hi", speaker="bob")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def wait_idle(servicer: OmniServicer, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while servicer.active_turns and time.monotonic() < end:
        time.sleep(0.02)
    assert servicer.active_turns == 0


LONG = dict(text="Tell me a long story.", greedy=True, max_new_tokens=200, max_audio_frames=400)


def test_client_disconnect_mid_stream_frees_the_turn(gateway, stages, tmp_path):
    address, servicer = gateway

    async def disconnect_after_first_audio():
        async with OmniClient(address) as client:
            turn = client.converse(**LONG)
            async for event in turn:
                if isinstance(event, AudioChunk):
                    break
            await turn.close()

    asyncio.run(disconnect_after_first_audio())
    wait_idle(servicer)
    argv = ["--text", "Hello world, this is Qwen.", *SHORT]
    assert_same(chat(address, argv, tmp_path), generate(stages, argv, tmp_path))


def test_cancel_message_ends_with_a_cancelled_summary(gateway):
    address, servicer = gateway

    async def cancel_after_first_audio():
        async with OmniClient(address) as client:
            turn = client.converse(session_id="s-cancelled", **LONG)
            events = []
            async for event in turn:
                events.append(event)
                if isinstance(event, AudioChunk) and event.seq == 0:
                    await turn.cancel("user barged in")
            return events

    events = asyncio.run(cancel_after_first_audio())
    summary = events[-1]
    assert summary.finish_reason == "cancelled" and summary.codes  # the frames heard (see the test below)
    assert summary.text == "".join(e.text for e in events if isinstance(e, TextDelta))
    assert summary.num_samples == sum(e.samples.size for e in events if isinstance(e, AudioChunk)) > 0
    assert len(summary.thinker_token_ids) < 200
    wait_idle(servicer)
    assert asyncio.run(servicer.sessions.load("s-cancelled")).messages == []  # a cancelled turn is not history


def test_cancel_before_end_of_turn(gateway):
    async def go():
        async with OmniClient(gateway[0]) as client:
            turn = client.converse(text="never mind")
            await turn.cancel()
            return [e async for e in turn]

    (summary,) = asyncio.run(go())
    assert summary.finish_reason == "cancelled" and summary.thinker_token_ids == []


def test_expired_deadline(gateway):
    address, servicer = gateway
    with pytest.raises(ConverseError, match="DEADLINE_EXCEEDED"):
        OmniClient(address).converse_sync(deadline_s=0.5, **LONG)
    wait_idle(servicer)
    assert_serving(address)


def test_chat_errors_are_one_line_with_the_status_name(gateway, tmp_path):
    """`omni chat` raises OmniErrors, which the CLI prints as one line with a non-zero exit status."""
    with pytest.raises(ConverseError, match=r"^INVALID_ARGUMENT: unknown speaker 'nobody'") as info:
        chat(gateway[0], ["--text", "hi", "--speaker", "nobody"], tmp_path)
    assert isinstance(info.value, OmniError) and "\n" not in str(info.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(ConverseError, match="^UNAVAILABLE: "):
        chat(closed, ["--text", "hi", "--deadline", "10"], tmp_path)


def test_video_with_its_sound_track(gateway, stages, media):
    frames = sorted((media["dir"] / "video").iterdir())
    summary, samples = OmniClient(gateway[0]).converse_sync(
        text="What happens?", videos=[Video(frames=frames, timestamps=[0.0, 0.5], audio=media["audio"])],
        greedy=True, max_new_tokens=8, max_audio_frames=24)
    video = load_video([str(f) for f in frames], [0.0, 0.5], audio=media["audio"])
    ref, ref_samples = asyncio.run(collect(Conductor(stages), TurnRequest(
        parts=[video_part(video), text_part("What happens?")], max_new_tokens=8, max_audio_frames=24)))
    assert summary.thinker_token_ids == ref.thinker_token_ids and summary.codes == ref.codes
    np.testing.assert_array_equal(float_to_pcm16(samples), float_to_pcm16(ref_samples))


# ---- a turn's parts in arrival order (issue 9) ---------------------------------------------------------------


def test_converse_parts_keep_their_arrival_order_and_the_session_keeps_them(gateway, reference, processor, media):
    """Chunks of several parts interleaved on the wire: each part stands where its first chunk arrived, text
    between media stays there, and greedy output equals the reference `generate` on the conversation as sent.
    The session keeps the parts in that order: the next turn, media in another order, equals the reference on
    the whole conversation."""
    address, servicer = gateway
    session = "s-ordered-parts"
    t = np.arange(16000) / 16000
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * 330 * t)).astype("<i2")
    wide = encoded(PIL.Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 128, 3), dtype=np.uint8)),
                   "PNG")
    small = (media["dir"] / "noise.png").read_bytes()
    wav = (media["dir"] / "chirp.wav").read_bytes()

    def text(value: str) -> omni_pb2.ConverseRequest:
        return omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text=value))

    def audio(audio_id: str, **data) -> omni_pb2.ConverseRequest:
        return omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(audio_id=audio_id, **data))

    def turn(*parts) -> TurnSummary:
        requests = [config(session_id=session, thinker_sampling=common_pb2.SamplingParams(greedy=True),
                           max_new_tokens=8, max_audio_frames=24), *parts, END]
        responses, error = asyncio.run(responses_and_error(address, requests))
        assert error is None, error
        s = responses[-1].summary
        return TurnSummary(text=s.text, thinker_token_ids=list(s.thinker_token_ids),
                           codes=[list(f.codes) for f in s.codes], sample_rate=s.sample_rate,
                           num_samples=s.num_samples, speaker=s.speaker, finish_reason="", timings={})

    half = len(wide) // 2
    first = turn(text("This one: "), image_part(wide[:half], "w"), audio("x", pcm16=pcm[:8000].tobytes(),
                                                                        sample_rate=16000),
                 text(" and "), text("this one: "), image_part(wide[half:], "w"), image_part(small, "s"),
                 audio("x", pcm16=pcm[8000:].tobytes()), text("?"))
    sent = [{"type": "text", "text": "This one: "}, {"type": "image", "image": wide},
            {"type": "audio", "audio": pcm.astype(np.float32) / 32768},
            {"type": "text", "text": " and this one: "}, {"type": "image", "image": small},
            {"type": "text", "text": "?"}]
    want = TurnRequest(parts=sent, max_new_tokens=8, max_audio_frames=24)
    ids, codes = reference_run(reference, processor, want)
    assert first.thinker_token_ids == ids and first.codes == codes.tolist()
    stored = asyncio.run(servicer.sessions.load(session)).messages
    assert [p["type"] for p in stored[0]["content"]] == ["text", "image", "audio", "text", "image", "text"]

    second = turn(text("Now compare "), audio("y", encoded=wav), text(" with "), image_part(small, "s2"))
    history = [{"role": "user", "content": sent}, {"role": "assistant", "content": first.text}]
    want = TurnRequest(parts=[{"type": "text", "text": "Now compare "}, {"type": "audio", "audio": wav},
                              {"type": "text", "text": " with "}, {"type": "image", "image": small}],
                       history=history, max_new_tokens=8, max_audio_frames=24)
    ids, codes = reference_run(reference, processor, want)
    assert second.thinker_token_ids == ids and second.codes == codes.tolist()


def test_command_line_parts_keep_their_order(media, tmp_path):
    from services.generate import build_request

    args = parse(add_generate_arguments, ["--model", "unused", "--no-audio", "--image", media["image"], "--text",
                                          "and", "--audio", media["audio"], "--image", media["image"]])
    assert [(p["type"], p[p["type"]]) for p in build_request(args).parts] == [
        ("image", media["image"]), ("text", "and"), ("audio", media["audio"]), ("image", media["image"])]
    conversation = tmp_path / "conversation.json"
    last = [{"type": "image", "image": media["image"]}, {"type": "text", "text": "and"},
            {"type": "audio", "audio": media["audio"]}]
    conversation.write_text(json.dumps([{"role": "user", "content": last}]))
    args = parse(add_generate_arguments, ["--model", "unused", "--no-audio", "--conversation", str(conversation)])
    request = build_request(args)
    assert request.parts == last and request.history == []  # the file's last user message is the turn, in order


# ---- bounded decoding, precise errors (issue 11) --------------------------------------------------------------


async def responses_and_error(address: str, requests: list) -> tuple[list, grpc.aio.AioRpcError | None]:
    """The responses of a call that sends `requests` as given, and its error (None if it ended OK)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = omni_pb2_grpc.OmniStub(channel).Converse(iter(requests), timeout=30)
        got = []
        try:
            async for response in call:
                got.append(response)
        except grpc.aio.AioRpcError as e:
            return got, e
        return got, None


def image_part(data: bytes, image_id: str = "img") -> omni_pb2.ConverseRequest:
    return omni_pb2.ConverseRequest(image=omni_pb2.ImageInput(image_id=image_id, data=data))


def encoded(image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """The issue's case: a 7070x7070 PNG of a few tens of KB (1-bit, so writing it here is cheap too)."""
    data = encoded(PIL.Image.new("1", (7070, 7070)), "PNG", optimize=True)
    assert len(data) < 100_000
    return data


class LoadSpy:
    """Records the size of every image PIL decodes (its real `ImageFile.load`, wrapped) and the peak RSS of this
    process (the gateway's) while it is active, sampled every 2 ms."""

    def __init__(self, monkeypatch):
        self.sizes, self.peak = [], 0
        real = PIL.ImageFile.ImageFile.load

        def load(image):
            self.sizes.append(image.size)
            return real(image)

        monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", load)
        self.base = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, process.memory_info().rss)

    def stop(self) -> int:
        """Peak RSS growth in bytes."""
        self._stop.set()
        self._thread.join()
        return max(self.peak - self.base, 0)


def test_a_7070x7070_png_is_refused_before_decoding(gateway, bomb_png, monkeypatch):
    spy = LoadSpy(monkeypatch)
    got, error = asyncio.run(responses_and_error(gateway[0], [config(), image_part(bomb_png, "bomb"), END]))
    growth = spy.stop()
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert "image 'bomb'" in error.details() and "7070x7070 = 49,984,900 pixels" in error.details()
    assert "budget of 40,000,000 decoded pixels" in error.details() and "max_decoded_pixels" in error.details()
    assert spy.sizes == []  # nothing was decoded
    assert growth < 60 << 20, f"the gateway grew by {growth >> 20} MB"  # decoding it costs 150 MB as RGB alone
    assert_serving(gateway[0])


def test_a_big_jpeg_is_decoded_at_a_fraction_of_its_size(gateway, processor, monkeypatch):
    """A 4000x3000 JPEG is 12 MP; the processor uses at most 1.31 MP of it, so PIL decodes it at 1/2 scale."""
    rng = np.random.default_rng(1)
    small = PIL.Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    jpeg = encoded(small.resize((4000, 3000)), "JPEG", quality=50)
    assert len(jpeg) < MAX_REQUEST_BYTES
    spy = LoadSpy(monkeypatch)
    summary, _ = OmniClient(gateway[0]).converse_sync(text="What is it?", images=[jpeg], greedy=True,
                                                      max_new_tokens=3, audio_output=False)
    spy.stop()
    assert len(summary.thinker_token_ids) == 3
    assert (2000, 1500) in spy.sizes and (4000, 3000) not in spy.sizes, spy.sizes


def test_load_image_reduces_what_the_processor_would_shrink():
    target = 1280 * 32 * 32
    png = encoded(PIL.Image.new("RGB", (4000, 3000), "red"), "PNG")
    assert load_image(png, target_pixels=target).size == (1334, 1000)  # reduce(3), rounding up: still >= target
    assert load_image(png).size == (4000, 3000)  # no target: as the reference
    small = encoded(PIL.Image.new("RGB", (2000, 1500), "red"), "PNG")  # under 4x the target: untouched
    assert load_image(small, target_pixels=target).size == (2000, 1500)


@pytest.fixture(scope="module")
def small_budget(stages):
    """A gateway whose media budget is small: 100,000 pixels, 10 s of 16 kHz mono."""
    loop = LoopThread()
    servicer = OmniServicer(stages, InProcessSessions(), max_request_bytes=MAX_REQUEST_BYTES, default_deadline_s=60,
                            max_decoded_pixels=100_000, max_decoded_samples=160_000)
    server, port = loop.run(start_gateway(servicer))
    yield f"127.0.0.1:{port}"
    loop.run(server.stop(None))
    loop.stop()


def flac(seconds: float, rate: int = 16000, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((int(seconds * rate), channels), np.int16), rate, format="FLAC")
    return buf.getvalue()


@pytest.mark.parametrize("parts, message", [
    ([omni_pb2.AudioInput(audio_id="long", encoded=flac(12))],
     "audio 'long': it is 12.0 s at 16000 Hz x 1 channel(s) = 192,000 samples, which takes the turn's audio past its "
     "budget of 160,000 decoded samples"),
    # Two audios within budget each, not together; the 48 kHz stereo one counts both channels at its own rate.
    ([omni_pb2.AudioInput(audio_id="a", encoded=flac(6)),
      omni_pb2.AudioInput(audio_id="b", encoded=flac(1, 48000, 2))], "audio 'b': it is 1.0 s at 48000 Hz x 2"),
    ([omni_pb2.AudioInput(audio_id="pcm", pcm16=bytes(2 * 170_000), sample_rate=16000)],
     "audio 'pcm': it is 10.6 s at 16000 Hz x 1 channel(s) = 170,000 samples"),
    ([omni_pb2.ImageInput(image_id="a", data=encoded(PIL.Image.new("RGB", (200, 200)), "PNG")),
      omni_pb2.ImageInput(image_id="b", data=encoded(PIL.Image.new("RGB", (300, 300)), "PNG"))],
     "image 'b': it decodes to 300x300 = 90,000 pixels, which takes the turn's images and video frames past their "
     "budget of 100,000 decoded pixels"),
    ([omni_pb2.VideoFrame(video_id="v", image=encoded(PIL.Image.new("RGB", (200, 100)), "PNG"), timestamp_s=t)
      for t in range(6)], "video 'v' frame 5: it decodes to 200x100"),
], ids=["long-flac", "two-audios", "pcm-bytes", "two-images", "video-frames"])
def test_media_over_the_budget_is_refused_naming_the_input(small_budget, parts, message):
    requests = [config(), *[omni_pb2.ConverseRequest(**{_kind(p): p}) for p in parts], END]
    _, error = asyncio.run(responses_and_error(small_budget, requests))
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert message in error.details(), error.details()
    assert_serving(small_budget)


def _kind(part) -> str:
    return {"AudioInput": "audio", "ImageInput": "image", "VideoFrame": "video_frame"}[type(part).__name__]


def test_media_within_the_budget_is_answered(small_budget, media):
    summary, _ = OmniClient(small_budget).converse_sync(text="Hi", audios=[media["audio"]], images=[media["image"]],
                                                        greedy=True, max_new_tokens=2, audio_output=False)
    assert len(summary.thinker_token_ids) == 2


def test_invalid_utf8_in_a_text_part_is_invalid_argument(gateway):
    """proto3 strings must be UTF-8: such a message fails to parse. Sent as raw bytes, as a client in another
    language (or a broken one) could."""
    good = omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="ab")).SerializeToString()
    bad_config = config(session_id="zz", request_id="r").SerializeToString().replace(b"zz", b"\xc3\x28")

    async def send(messages: list[bytes]) -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(gateway[0]) as channel:
            call = channel.stream_stream("/omni.v1.Omni/Converse", request_serializer=bytes,
                                         response_deserializer=omni_pb2.ConverseResponse.FromString)(iter(messages),
                                                                                                     timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            return info.value

    error = asyncio.run(send([config().SerializeToString(), good.replace(b"ab", b"\xff\xfe"), END.SerializeToString()]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "a text part is not valid UTF-8: field text.text (protobuf strings must be UTF-8)"
    error = asyncio.run(send([bad_config]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "field config.session_id" in error.details()
    error = asyncio.run(send([config().SerializeToString(), b"\xff\xff\xff", END.SerializeToString()]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid omni.v1.ConverseRequest" in error.details()
    assert_serving(gateway[0])


@pytest.mark.parametrize("part, message", [
    (omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(audio_id="q", encoded=b"RIFF not really a wave file")),
     "audio 'q': cannot decode audio: Format not recognised."),
    (image_part(b"GIF89a but then nothing", "pic"), "image 'pic': not a readable image"),
    (image_part(b"\x00" * 64, "zeros"), "image 'zeros': not a readable image: not a format Pillow can decode"),
], ids=["audio", "truncated-gif", "unknown-format"])
def test_decode_errors_name_the_input_without_python_reprs(gateway, part, message):
    _, error = asyncio.run(responses_and_error(gateway[0], [config(), part, END]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details(), error.details()
    assert "0x" not in error.details() and "object at" not in error.details()


def test_an_unreachable_stage_is_named_without_its_address(stages, caplog):
    """A Thinker whose replica is gone: UNAVAILABLE naming the stage; the address only in the gateway's log."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    loop = LoopThread()

    async def start():
        thinker = RemoteThinker(grpc.aio.insecure_channel(closed))
        return await start_gateway(OmniServicer(dataclasses.replace(stages, thinker=thinker), InProcessSessions()))

    server, port = loop.run(start())
    try:
        with caplog.at_level("WARNING", logger="services.servicers.status"):
            _, error = asyncio.run(responses_and_error(f"127.0.0.1:{port}", [
                config(output_modalities=[omni_pb2.MODALITY_TEXT]),
                omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="hi")), END]))
    finally:
        loop.run(server.stop(None))
        loop.stop()
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert error.details().startswith("thinker stage: UNAVAILABLE: no replica could be reached"), error.details()
    assert closed.split(":")[1] not in error.details() and "127.0.0.1" not in error.details()
    assert closed.split(":")[1] in caplog.text  # the operator still sees where it tried


@pytest.mark.parametrize("cfg, message", [
    (dict(max_audio_frames=2**31 - 1), "max_audio_frames is 2147483647, more than the Talker's positions"),
    (dict(max_new_tokens=10**6), "max_new_tokens is 1000000"),
    (dict(session_id="s" * 257), "session_id is 257 characters, the limit is 256"),
    (dict(request_id="r" * 300), "request_id is 300 characters"),
    (dict(metadata={f"k{i}": "v" for i in range(65)}), "metadata has 65 entries"),
    (dict(metadata={"k": "v" * 2000}), "metadata entry 'k'"),
], ids=["max-audio-frames", "max-new-tokens", "session-id", "request-id", "metadata-entries", "metadata-value"])
def test_config_limits_are_checked_before_the_turn_starts(gateway, cfg, message):
    got, error = asyncio.run(responses_and_error(gateway[0], [config(**cfg)]))
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details(), error
    assert got == []  # refused at the config: no TurnStarted, nothing uploaded


def test_a_cancelled_turn_summary_has_the_codes_of_the_audio_sent(gateway):
    turn_args = dict(text="Tell me a story.", greedy=True, max_new_tokens=40, max_audio_frames=60)
    full, _ = OmniClient(gateway[0]).converse_sync(**turn_args)

    async def cancel_after_two_chunks():
        async with OmniClient(gateway[0]) as client:
            turn = client.converse(**turn_args)
            events = []
            async for event in turn:
                events.append(event)
                if isinstance(event, AudioChunk) and event.seq == 1:
                    await turn.cancel()
            return events

    events = asyncio.run(cancel_after_two_chunks())
    summary = events[-1]
    assert summary.finish_reason == "cancelled" and len(full.codes) > len(summary.codes) >= 2
    assert summary.codes == full.codes[:len(summary.codes)]  # greedy: the same frames, in order


def test_a_cancel_while_the_answer_waits_for_a_slow_reader_ends_with_the_summary(gateway):
    """A client that stops reading fills its flow-control window, so the gateway's write of the next packet waits
    when the cancel comes; the summary must follow that write, not fail the call with INTERNAL (CI saw this)."""

    async def cancel_unread_answer():
        # Without BDP probing the window stays at its 64 KiB start: about 1.4 s of audio.
        async with grpc.aio.insecure_channel(gateway[0], options=[("grpc.http2.bdp_probe", 0)]) as channel:
            call = omni_pb2_grpc.OmniStub(channel).Converse(timeout=60)
            for msg in (config(max_new_tokens=400, max_audio_frames=4000),
                        omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="Tell me a long story.")), END):
                await call.write(msg)
            await asyncio.sleep(1.5)  # the answer fills the window meanwhile
            await call.write(omni_pb2.ConverseRequest(cancel=omni_pb2.Cancel()))
            await call.done_writing()
            return [msg async for msg in call]

    for _ in range(2):  # each try hit the bug before the fix (6 of 6)
        messages = asyncio.run(cancel_unread_answer())
        summary = messages[-1].summary
        assert summary.finish_reason == common_pb2.FINISH_REASON_CANCELLED
        audio = [m.audio for m in messages if m.WhichOneof("kind") == "audio"]
        assert len(audio) >= 10  # more than the window holds: the answer was waiting on the client
        assert summary.num_samples == sum(len(a.pcm16) // 2 for a in audio) and len(summary.codes) == len(audio)
