"""Metrics and traces of a turn across the deployment's topology: every stage behind its own gRPC server on
loopback (the hooks stage and the Talker's MTP included), a gateway in front, a client calling it.

Metrics are read from prometheus_client's registry (outside Ray the same names go there); spans from an in-memory
exporter on an SDK tracer provider installed for this module (tests/test_serving.py checks the same trace through
Ray Serve with a real OTLP receiver)."""

from __future__ import annotations

import asyncio

import grpc
import prometheus_client
import pytest
import pytest_asyncio
import torch
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler

from services.engines.bundle import Engines
from services.errors import InvalidInput
from services.gateway import OmniServicer, start_gateway
from services.hooks import FilterChain
from services.remote import RemoteHooks, RemoteMTP, close_stages, remote_stages
from services.servicers import serve_stage
from services.servicers.audio_encoder import AudioEncoderServicer
from services.servicers.code2wav import Code2WavServicer
from services.servicers.hooks import HooksServicer
from services.servicers.mtp import MTPServicer
from services.servicers.talker import TalkerServicer
from services.servicers.thinker import ThinkerServicer
from services.servicers.vision_encoder import VisionEncoderServicer
from services.sessions import InProcessSessions
from services.stages import LocalTalker, Stages
from services.wire.gen.omni.v1 import common_pb2, omni_pb2, omni_pb2_grpc
from services.wire.server import GRPC_OPTIONS

pytestmark = [pytest.mark.asyncio(loop_scope="module"),
              pytest.mark.filterwarnings("ignore:The given buffer is not writable")]
HOST = "127.0.0.1"
STAGES = ("audio_encoder", "vision_encoder", "thinker", "hooks", "talker", "mtp", "code2wav")
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class _Switch(Sampler):
    """The process has one global tracer provider: record this module's spans only."""

    on = False

    def should_sample(self, *args, **kwargs):
        return (ALWAYS_ON if self.on else ALWAYS_OFF).should_sample(*args, **kwargs)

    def get_description(self) -> str:
        return "omni-test-switch"


_SWITCH = _Switch()
_SPANS = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(sampler=_SWITCH)
        trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(_SPANS))
    if trace.get_tracer_provider().sampler is not _SWITCH:
        pytest.fail("another module installed a tracer provider")
    _SWITCH.on = True
    yield _SPANS
    _SWITCH.on = False
    _SPANS.clear()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(tiny_ckpt, spans):
    """A gateway whose stages are all remote, in the Serve topology; yields its address."""
    local = Stages.local(Engines.load(tiny_ckpt))
    servers = []

    async def serve(servicer) -> str:
        server, port = await serve_stage(servicer, host=HOST)
        servers.append(server)
        return f"{HOST}:{port}"

    talker_mtp = RemoteMTP(grpc.aio.insecure_channel(await serve(MTPServicer(local.talker.mtp)), options=GRPC_OPTIONS))
    addresses = {
        "audio": await serve(AudioEncoderServicer(local.audio)),
        "vision": await serve(VisionEncoderServicer(local.vision)),
        "thinker": await serve(ThinkerServicer(local.thinker, local.stop_ids)),
        "talker": await serve(TalkerServicer(LocalTalker(local.talker.engine, talker_mtp))),
        "code2wav": await serve(Code2WavServicer(local.code2wav, local.sample_rate)),
    }
    hooks_address = await serve(HooksServicer(FilterChain([]), local.processor))
    hooks = RemoteHooks(grpc.aio.insecure_channel(hooks_address, options=GRPC_OPTIONS))
    remote = remote_stages(addresses, local.processor, local.speakers, local.stop_ids, local.sample_rate)
    servicer = OmniServicer(remote, InProcessSessions(), hooks=hooks, default_deadline_s=120)
    server, port = await start_gateway(servicer)
    yield f"{HOST}:{port}"
    await server.stop(None)
    await close_stages(remote)
    await hooks.channel.close()
    await talker_mtp.close()
    await talker_mtp.channel.close()
    for s in servers:
        await s.stop(None)


def _turn(media, session_id: str = "") -> list[omni_pb2.ConverseRequest]:
    config = omni_pb2.ConverseConfig(session_id=session_id, max_new_tokens=6, max_audio_frames=8,
                                     thinker_sampling=common_pb2.SamplingParams(greedy=True))
    with open(media["audio"], "rb") as f:
        audio = f.read()
    with open(media["image"], "rb") as f:
        image = f.read()
    return [omni_pb2.ConverseRequest(config=config),
            omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(audio_id="a", encoded=audio)),
            omni_pb2.ConverseRequest(image=omni_pb2.ImageInput(image_id="i", data=image)),
            omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="What is this?")),
            omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn())]


async def _converse(address: str, requests, metadata=()) -> tuple[str, omni_pb2.TurnSummary]:
    request_id, summary = None, None
    async with grpc.aio.insecure_channel(address) as channel:
        call = omni_pb2_grpc.OmniStub(channel).Converse(iter(requests), metadata=metadata, timeout=120)
        async for msg in call:
            if msg.WhichOneof("kind") == "started":
                request_id = msg.started.request_id
            elif msg.WhichOneof("kind") == "summary":
                summary = msg.summary
    return request_id, summary


def _value(name: str, **labels) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


def _counts() -> dict[str, float]:
    out = {stage: _value("omni_stage_ttft_seconds_count", stage=stage) for stage in STAGES}
    out["mtp_items"] = _value("omni_stage_item_seconds_count", stage="mtp")
    out["first_audio"] = _value("omni_time_to_first_audio_seconds_count")
    out["first_text"] = _value("omni_time_to_first_text_seconds_count")
    return out


async def test_each_turn_is_counted_once_and_every_stage_has_one_first_output(gateway, media):
    before = _counts()
    turns = 3
    frames = 0
    for _ in range(turns):
        _, summary = await _converse(gateway, _turn(media))
        assert summary.num_samples > 0
        frames += len(summary.codes)
    after = _counts()
    # Once per turn: the gateway's turn metrics (they were recorded twice) and each stage's time to first
    # output, the hooks stage's and MTP's included (MTP's was observed once per frame).
    for key in (*STAGES, "first_audio", "first_text"):
        assert after[key] - before[key] == turns, key
    assert after["mtp_items"] - before["mtp_items"] == frames - turns  # MTP's other frames are items


async def test_stage_errors_are_counted_by_grpc_status_name(gateway, tiny_ckpt):
    local = Stages.local(Engines.load(tiny_ckpt))

    async def bad_frames():
        yield (local.code2wav.engine.codebook_size,) * 16  # one past the codebook

    before = _value("omni_stage_errors_total", stage="code2wav", code="INVALID_ARGUMENT")
    with pytest.raises(InvalidInput):
        async for _ in local.code2wav.decode(bad_frames()):
            pass
    assert _value("omni_stage_errors_total", stage="code2wav", code="INVALID_ARGUMENT") == before + 1
    codes = {s.labels["code"] for m in prometheus_client.REGISTRY.collect() if m.name == "omni_stage_errors"
             for s in m.samples}
    assert codes and codes <= {c.name for c in grpc.StatusCode}, codes


async def test_one_trace_per_turn_spans_every_stage_under_the_clients_span(gateway, media, spans):
    spans.clear()
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    request_id, summary = await _converse(gateway, _turn(media, session_id="obs-1"),
                                          metadata=(("traceparent", traceparent),))
    assert summary.num_samples > 0
    await asyncio.sleep(0.2)  # the stage servers end their spans as their calls close
    finished = [s for s in spans.get_finished_spans() if s.context.trace_id == int(CLIENT_TRACE, 16)]
    by_id = {s.context.span_id: s for s in finished}
    (turn,) = [s for s in finished if s.name == "omni.turn"]
    assert turn.parent.span_id == int(CLIENT_SPAN, 16)  # the client's traceparent is continued
    assert turn.attributes["omni.request_id"] == request_id
    assert turn.attributes["omni.session_id"] == "obs-1"
    assert turn.attributes["omni.finish_reason"] in ("stop", "length")

    def ancestors(span) -> list[str]:
        names = []
        while span.parent is not None and span.parent.span_id in by_id:
            span = by_id[span.parent.span_id]
            names.append(span.name)
        return names

    stage_spans = [s for s in finished if s.attributes.get("omni.stage") and not s.name.endswith(".step")]
    assert {s.attributes["omni.stage"] for s in stage_spans} == set(STAGES)
    for span in stage_spans:
        # Each stage's span lives in its own server, under that call's gRPC server span, under the turn.
        assert "omni.turn" in ancestors(span), (span.name, ancestors(span))
        assert span.attributes["omni.request_id"] == request_id, span.name
        assert span.attributes["omni.session_id"] == "obs-1", span.name
        assert span.attributes["omni.replica"]
    mtp = [s for s in stage_spans if s.name == "mtp"]
    assert len(mtp) == len(summary.codes)  # one per frame, each under the Talker's span
    assert all(ancestors(s)[0] == "talker" for s in mtp)
    firsts = [s for s in stage_spans if s.name != "mtp" or s is mtp[0]]
    assert all("omni.first_output_s" in s.attributes for s in firsts), [s.name for s in firsts]
    # MTP's engine steps, batched across requests, link to the frames' spans (in their request's trace).
    steps = [s for s in finished if s.name == "mtp.step"]
    frame_contexts = {(s.context.trace_id, s.context.span_id) for s in mtp}
    assert steps and all(s.attributes["omni.batch_size"] == len(s.links) >= 1 for s in steps)
    assert {(link.context.trace_id, link.context.span_id) for s in steps for link in s.links} == frame_contexts
    names = {s.name for s in finished}
    assert {"thinker.prefill", "thinker.decode", "talker.prefill"} <= names
    talker_prefill = next(s for s in finished if s.name == "talker.prefill")
    assert ancestors(talker_prefill)[0] == "talker"
    assert talker_prefill.attributes["omni.prefilled_positions"] > 0
    rpc = [s for s in finished if s.name.startswith("/omni.v1.")]  # opentelemetry-instrumentation-grpc's
    assert {s.name.split("/")[1] for s in rpc} >= {"omni.v1.Thinker", "omni.v1.Talker", "omni.v1.Hooks",
                                                   "omni.v1.Code2Wav", "omni.v1.AudioEncoder"}
