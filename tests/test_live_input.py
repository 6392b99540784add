"""Live input (issue 9, point 2): a turn is prefilled while its parts stream in, window by window of audio, and
the answer equals the whole turn's: the same ids, codes and samples, for real speech (espeak-ng) streamed in
chunks of 20 ms, 100 ms and 1 s, shorter than one window, one window, several; with a louder moment that changes
earlier windows' log-mel features (redone); and with an image streamed before the audio."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf
from prometheus_client import REGISTRY

from services.engines.bundle import Engines
from services.gateway import OmniServicer, start_gateway
from services.live_input import WARM_S
from services.log_mel import MIN_WIDTH
from services.sessions import InProcessSessions
from services.stages import Stages
from services.wire.gen.omni.v1 import common_pb2, omni_pb2, omni_pb2_grpc

pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (real speech)")]
RATE = 22050  # espeak-ng's


@dataclass
class Gateways:
    live: str
    whole: str
    engines: Engines
    stages: Stages


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """About 25 s of real speech, PCM16 at 22.05 kHz."""
    wav = tmp_path_factory.mktemp("speech") / "speech.wav"
    text = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wound the clock, and "
            "wrote in his log what ships had passed and how the wind had turned. On stormy nights he stayed awake "
            "until the morning, listening to the waves against the rocks below, and counting the hours.")
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
    pcm, rate = sf.read(wav, dtype="int16")
    assert rate == RATE
    return np.tile(pcm, 2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateways(tiny_ckpt):
    engines = Engines.load(tiny_ckpt)
    stages = Stages.local(engines)
    servers, ports = [], []
    for live in (True, False):
        server, port = await start_gateway(OmniServicer(stages, InProcessSessions(), live_prefill=live))
        servers.append(server)
        ports.append(f"127.0.0.1:{port}")
    yield Gateways(*ports, engines, stages)
    for server in servers:
        await server.stop(None)


def counter(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def turn(pcm: np.ndarray, chunk_s: float, image: bytes | None = None) -> list:
    config = omni_pb2.ConverseConfig(max_new_tokens=8, max_audio_frames=20,
                                     thinker_sampling=common_pb2.SamplingParams(greedy=True))
    step = int(chunk_s * RATE)
    msgs = [omni_pb2.ConverseRequest(config=config)]
    if image is not None:
        msgs += [omni_pb2.ConverseRequest(image=omni_pb2.ImageInput(image_id="i", data=image)),
                 omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="Look, then listen: "))]
    msgs += [omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(audio_id="a", sample_rate=RATE,
                                                                pcm16=pcm[i:i + step].tobytes()))
             for i in range(0, len(pcm), step)]
    return msgs + [omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text=" What was that?")),
                   omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn())]


async def converse(address: str, msgs: list, audio_s_per_s: float = 0.0) -> tuple[omni_pb2.TurnSummary, bytes]:
    """Send a turn, the audio at `audio_s_per_s` seconds of audio per second (0: at once); its summary and PCM."""

    async def send():
        for msg in msgs:
            yield msg
            if audio_s_per_s and msg.WhichOneof("kind") == "audio":
                await asyncio.sleep(len(msg.audio.pcm16) / 2 / RATE / audio_s_per_s)

    pcm, summary = bytearray(), None
    async with grpc.aio.insecure_channel(address) as channel:
        async for msg in omni_pb2_grpc.OmniStub(channel).Converse(send()):
            if msg.WhichOneof("kind") == "audio":
                pcm += msg.audio.pcm16
            elif msg.WhichOneof("kind") == "summary":
                summary = msg.summary
    return summary, bytes(pcm)


async def assert_live_equals_whole(gateways: Gateways, msgs: list, speed: float) -> dict[str, float]:
    """The turn streamed to the live gateway at `speed` x real time equals it sent at once to the whole-turn one;
    what the live prefill did."""
    names = {"prefills": ("omni_live_prefills_total", {}), "redos": ("omni_thinker_prefix_redos_total", {}),
             "reused": ("omni_stage_prompt_tokens_total", {"stage": "thinker", "kind": "reused"}),
             "talker_reused": ("omni_stage_prompt_tokens_total", {"stage": "talker", "kind": "reused"})}
    before = {k: counter(n, **labels) for k, (n, labels) in names.items()}
    live = await converse(gateways.live, msgs, speed)
    done = {k: counter(n, **labels) - before[k] for k, (n, labels) in names.items()}
    assert_same_answer(live, await converse(gateways.whole, msgs))
    return done


def assert_same_answer(live: tuple[omni_pb2.TurnSummary, bytes], whole: tuple[omni_pb2.TurnSummary, bytes]) -> None:
    """Two `converse` results: the same ids, codes and samples."""
    assert list(live[0].thinker_token_ids) == list(whole[0].thinker_token_ids)
    assert [list(f.codes) for f in live[0].codes] == [list(f.codes) for f in whole[0].codes]
    assert live[1] == whole[1] and len(live[1]) > 0


@pytest.mark.parametrize("seconds, chunk_s", [(2.0, 0.1), (8.0, 0.1), (20.0, 0.02), (20.0, 0.1), (20.0, 1.0)],
                         ids=["2s-100ms", "one-window-100ms", "20s-20ms", "20s-100ms", "20s-1s"])
async def test_streamed_audio_equals_the_whole_turn(gateways, speech, seconds, chunk_s):
    pcm = speech[:int(seconds * RATE)]
    done = await assert_live_equals_whole(gateways, turn(pcm, chunk_s), speed=20.0)
    if seconds >= 16.2:  # two whole 8 s windows and the margin: prefilled while streaming, then taken back
        assert done["prefills"] >= 1 and done["reused"] > 0 and done["talker_reused"] > 0, done
    else:  # no whole window before the end: nothing to prefill early
        assert done["prefills"] == 0, done


async def test_a_turn_that_defers_its_prefill_is_prefilled_at_its_end(gateways, speech):
    """`ConverseConfig.defer_prefill`: the live gateway prefills nothing before end_of_turn (what `omni bench input`
    compares against a deployment's live path), and the answer is the same."""
    msgs = turn(speech[:int(20 * RATE)], 0.1)
    msgs[0].config.defer_prefill = True
    done = await assert_live_equals_whole(gateways, msgs, speed=20.0)
    assert done["prefills"] == 0 and done["reused"] == 0, done


async def test_a_louder_moment_redoes_the_earlier_windows_and_still_equals_the_whole_turn(gateways, speech):
    """10 s whispered, then 10 s at full volume: the log-mel clamp (maximum - 8) rises, so the first window's
    features, prefilled while quiet, change; it is prefilled again, and the answer is the whole turn's."""
    quiet = (speech[:int(10 * RATE)] * 0.0005).astype(np.int16)
    pcm = np.concatenate([quiet, speech[int(10 * RATE):int(20 * RATE)]])
    done = await assert_live_equals_whole(gateways, turn(pcm, 0.1), speed=20.0)
    assert done["prefills"] >= 1 and done["redos"] >= 1, done


async def test_a_louder_moment_in_the_partial_window_is_caught_up_before_the_end_of_turn(gateways, speech):
    """9 s whispered (a whole window prefilled while quiet), then 1.5 s loud and 4.5 s softer, past the last whole
    window: the warm-up that sees the loud moment starts a prefill of all the audio so far, so the first window is
    redone while the audio still streams, and `end_of_turn` reuses it (without the catch-up it would redo it then)."""
    quiet = (speech[:int(9 * RATE)] * 0.0005).astype(np.int16)
    softer = (speech[int(10.5 * RATE):int(15 * RATE)] * 0.3).astype(np.int16)
    pcm = np.concatenate([quiet, speech[int(9 * RATE):int(10.5 * RATE)], softer])
    msgs = turn(pcm, 0.1)
    names = {"catch-ups": "omni_live_catch_ups_total", "redos": "omni_thinker_prefix_redos_total"}
    before = {k: counter(n) for k, n in names.items()}
    reused = {}

    async def send():
        for msg in msgs:
            if msg.WhichOneof("kind") == "text":  # the audio is all in: its warm-ups and their prefills are done
                await asyncio.sleep(1.0)
                reused["before"] = counter("omni_stage_prompt_tokens_total", stage="thinker", kind="reused")
            yield msg
            if msg.WhichOneof("kind") == "audio":
                await asyncio.sleep(0.1 / 20)

    async with grpc.aio.insecure_channel(gateways.live) as channel:
        replies = [msg async for msg in omni_pb2_grpc.OmniStub(channel).Converse(send())]
    at_eot = counter("omni_stage_prompt_tokens_total", stage="thinker", kind="reused") - reused["before"]
    done = {k: counter(n) - before[k] for k, n in names.items()}
    assert done["catch-ups"] >= 1 and done["redos"] >= 1, done
    assert at_eot >= 104, at_eot  # the first window's 104 audio positions at least (13 per second of audio)
    live = replies[-1].summary
    whole, _ = await converse(gateways.whole, msgs)
    assert list(live.thinker_token_ids) == list(whole.thinker_token_ids)
    assert [list(f.codes) for f in live.codes] == [list(f.codes) for f in whole.codes]


async def test_the_end_of_turn_encodes_its_last_window_before_the_thinker_asks_for_it(gateways, speech, monkeypatch):
    """The Thinker replica holds the live prefill's windows: at end_of_turn the gateway knows which it will ask for
    (`prefix.expected_reuse`) and has them encoded beside the digests that prove the rest equal, not after its
    claim."""
    events, recording = [], [True]
    encode, claim = gateways.stages.audio.encode, gateways.engines.thinker.claim

    async def encode_spy(*args):
        if recording[0]:
            events.append("encode")
        return await encode(*args)

    def claim_spy(prompt):
        if recording[0]:
            events.append("claim")
        return claim(prompt)

    monkeypatch.setattr(gateways.stages.audio, "encode", encode_spy)
    monkeypatch.setattr(gateways.engines.thinker, "claim", claim_spy)
    msgs = turn(speech[:int(20 * RATE)], 0.1)
    live = await converse(gateways.live, msgs, 20.0)
    recording[0] = False
    answer = len(events) - 1 - events[::-1].index("claim")  # the answer's claim, after the live prefills'
    assert events.count("claim") >= 2 and events[answer - 1] == "encode", events
    assert "encode" not in events[answer:], events  # the replica asked for the windows already under way
    assert_same_answer(live, await converse(gateways.whole, msgs))


async def test_an_image_before_streamed_audio_is_prefilled_early(gateways, speech, media):
    image = open(media["image"], "rb").read()
    done = await assert_live_equals_whole(gateways, turn(speech[:int(4 * RATE)], 0.1, image), speed=20.0)
    assert done["prefills"] >= 1 and done["reused"] > 0 and done["talker_reused"] > 0, done


async def test_streaming_audio_is_resampled_and_transformed_as_it_arrives(gateways, speech):
    """Between prefills the gateway resamples a streaming audio and computes its log-mel frames every `WARM_S` of
    it, so that end_of_turn computes the frames of about its last second, not all those past its last whole window
    (7.8 s here): those of the last second, the matmul's `MIN_WIDTH` and a few the resampler held back."""
    frames = gateways.engines.processor.feature_extractor.frames
    config, *audio, text, end = turn(speech[:int(23.9 * RATE)], 0.1)
    msgs = [config, text, *audio, end]  # the audio last: nothing but end_of_turn completes it
    at_end = {}

    async def send():
        for msg in msgs:
            if msg.WhichOneof("kind") == "end_of_turn":
                await asyncio.sleep(0.5)  # the last warm-up and window's prefill are done
                at_end["computed"] = frames.frames_computed
            yield msg
            if msg.WhichOneof("kind") == "audio":
                await asyncio.sleep(0.1 / 20)

    async with grpc.aio.insecure_channel(gateways.live) as channel:
        replies = [msg async for msg in omni_pb2_grpc.OmniStub(channel).Converse(send())]
    assert replies[-1].WhichOneof("kind") == "summary" and replies[-1].summary.num_samples > 0
    at_eot = frames.frames_computed - at_end["computed"]
    assert 0 < at_eot <= (WARM_S + 0.1) * 100 + MIN_WIDTH + 10, at_eot


async def test_a_turn_cancelled_mid_stream_leaves_its_kv_first_to_go(gateways, speech):
    kv = gateways.engines.thinker.kv
    msgs = turn(speech[:int(20 * RATE)], 0.1)[:-2] + [omni_pb2.ConverseRequest(cancel=omni_pb2.Cancel())]
    before = counter("omni_live_prefills_total")
    summary, pcm = await converse(gateways.live, msgs, 20.0)
    assert summary.finish_reason == common_pb2.FINISH_REASON_CANCELLED and not pcm
    assert counter("omni_live_prefills_total") > before
    # What it prefilled is kept only until the replica needs room: the first it gives up.
    parked = kv.parked_positions
    assert parked > 0
    slot = kv.reserve(kv.free_positions + 1)
    assert kv.parked_positions < parked
    slot.close()


async def test_pcm_past_the_audio_budget_ends_the_turn_when_it_arrives(tiny_ckpt, speech):
    stages = Stages.local(Engines.load(tiny_ckpt))
    server, port = await start_gateway(OmniServicer(stages, InProcessSessions(), max_decoded_samples=5 * RATE))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await converse(f"127.0.0.1:{port}", turn(speech[:int(8 * RATE)], 0.5))
    finally:
        await server.stop(None)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "audio 'a'" in error.value.details() and "budget" in error.value.details()
