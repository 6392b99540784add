"""The Omni API over real gRPC (a grpc.aio server on loopback, in-process stages): `omni chat` equals
`omni generate` (token ids, codes, WAV samples) for text, audio, image and video input and a two-turn session;
concurrent streams; bad input ends with the right status and the server keeps serving."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import ConverseError, OmniClient, Video
from services.conductor import Conductor, TurnRequest
from services.engines.bundle import Engines
from services.errors import InvalidInput, OmniError
from services.events import AudioChunk, TextDelta, TurnSummary, float_to_pcm16
from services.gateway import OmniServicer, start_gateway
from services.preprocess import load_video
from services.sessions import InProcessSessions
from services.stages import Stages
from services.wire.gen.omni.v1 import omni_pb2, omni_pb2_grpc
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
)
from tests.helpers import LoopThread, assert_rejected_for_size

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
    with pytest.raises(InvalidInput, match="video 0 frame 1: 8388608 bytes"):
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
    assert summary.finish_reason == "cancelled" and summary.codes == []
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
        text="What happens?", videos=[video], max_new_tokens=8, max_audio_frames=24)))
    assert summary.thinker_token_ids == ref.thinker_token_ids and summary.codes == ref.codes
    np.testing.assert_array_equal(float_to_pcm16(samples), float_to_pcm16(ref_samples))
