"""The Ray Serve layer: the deploy configs, and a real local cluster running deploy/local.yaml with the tiny
checkpoint (one cluster for the module), called over gRPC through Serve's proxy and the replicas' own ports."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services import auth
from services.client import GATEWAY_METADATA, OmniClient, call_credentials
from services.errors import OmniError
from services.bench.load import batch_counts
from services.serving import serve_cmd
from services.serving.autoscaling import STAGE_CALLS, stage_load_policy
from services.wire.gen.omni.v1 import (
    common_pb2,
    hooks_pb2,
    hooks_pb2_grpc,
    omni_pb2,
    omni_pb2_grpc,
)
from services.wire.server import MAX_MESSAGE_BYTES, SERVICE_NAMES
from tests.api_contract import (
    INPUTS,
    check_chat_equals_generate,
    check_four_concurrent_streams,
    check_two_turn_session,
)
from tests.cluster import deployed, replica_addresses, stage_channel
from tests.helpers import assert_rejected_for_size
from tests.otlp import OTLPReceiver

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "deploy" / "local.yaml", ROOT / "deploy" / "gpu.yaml"]
SERVICES = {"omni": "Omni", "audio": "AudioEncoder", "vision": "VisionEncoder", "thinker": "Thinker",
            "hooks": "Hooks", "talker": "Talker", "mtp": "MTP", "code2wav": "Code2Wav"}
TEXT = "Hello! Who are you?"
MAX_NEW_TOKENS, MAX_FRAMES = 6, 10


# ---- configs (no cluster) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_a_serve_config_whose_builders_bind(path):
    from ray._common.utils import import_attr
    from ray.serve.config import AutoscalingConfig

    config = serve_cmd.load_config(path)  # ServeDeploySchema validation
    assert {app.name for app in config.applications} == set(SERVICES)
    for fn in config.grpc_options.grpc_servicer_functions:
        assert callable(import_attr(fn))
    for app in config.applications:
        assert app.route_prefix  # None would make every gRPC call to it NOT_FOUND
        bound = import_attr(app.import_path)(app.args)  # builders validate their args and only bind
        # The config's deployment options apply by name: they must name the builder's deployment.
        assert [d.name for d in app.deployments] == [bound._bound_deployment.name]
        assert Path(app.args["model"]).is_absolute()
        options = app.deployments[0].model_dump(exclude_unset=True)
        if "autoscaling_config" in options:
            AutoscalingConfig(**options["autoscaling_config"])  # what Serve parses at deploy time
        if policy := options.get("autoscaling_config", {}).get("policy"):
            assert import_attr(policy["policy_function"]) is stage_load_policy


def test_builders_reject_unknown_args_and_keep_torch_out_of_serve_build_tasks():
    import subprocess
    import sys

    from pydantic import ValidationError

    from services.serving.apps import gateway_app, hooks_app, thinker_app

    with pytest.raises(ValidationError):
        thinker_app({"model": "m", "devcie": "cuda"})
    with pytest.raises(ValidationError, match="filters.0.option"):
        hooks_app({"model": "m", "filters": [{"use": "redact", "option": {"words": ["x"]}}]})
    with pytest.raises(ValidationError, match="not both"):
        gateway_app({"model": "m", "hooks_app": "hooks", "hooks": {"filters": []}})
    # Serve imports the builders' module once per application to build it: no torch there (~8 s each).
    code = "import sys, services.serving.apps; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_load_config_overrides_model_and_port(tmp_path):
    config = serve_cmd.load_config(CONFIGS[0], model=tmp_path, port=12345)
    assert config.grpc_options.port == 12345
    assert {app.args["model"] for app in config.applications} == {str(tmp_path.resolve())}


def test_serve_refuses_a_missing_checkpoint_or_a_busy_port_before_starting_ray(tmp_path):
    import ray

    args = SimpleNamespace(config=str(CONFIGS[0]), model=str(tmp_path / "missing"), port=None, metrics_port=None)
    with pytest.raises(OmniError, match="does not exist"):
        serve_cmd.run_serve(args)
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        args.model, args.port = str(tmp_path), busy.getsockname()[1]
        with pytest.raises(OmniError, match="gRPC port .* is not available"):
            serve_cmd.run_serve(args)
    assert not ray.is_initialized()


def test_gpu_config_places_every_stage_on_a_gpu():
    config = serve_cmd.load_config(CONFIGS[1])
    gpus = {app.name: app.deployments[0].model_dump(exclude_unset=True)["ray_actor_options"].get("num_gpus", 0)
            for app in config.applications}
    assert gpus.pop("omni") == 0 and gpus.pop("hooks") == 0 and gpus.pop("thinker") == 1
    assert sum(gpus.values()) <= 1  # the other stages share one more GPU
    assert all(app.args["dtype"] == "bfloat16" for app in config.applications if app.name in gpus)


def test_a_sessions_replica_moves_only_when_its_own_replica_goes():
    """Rendezvous hashing (`routes._affine`): sessions spread over the replicas; removing one moves only its
    sessions, and adding one moves sessions only onto it."""
    from collections import Counter

    from services.serving.routes import _affine

    replicas = [f"127.0.0.{i}:9100" for i in range(1, 5)]
    keys = [f"p/session/{k}" for k in range(400)]
    before = {k: _affine(replicas, k) for k in keys}
    assert min(Counter(before.values()).values()) > 50  # 100 each on average
    gone = replicas[1]
    after = {k: _affine([r for r in replicas if r != gone], k) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != gone)
    new = "127.0.0.9:9100"
    grown = {k: _affine([*replicas, new], k) for k in keys}
    assert all(grown[k] in (before[k], new) for k in keys) and new in grown.values()


def test_stage_load_policy_adds_reported_calls_to_serve_requests():
    ctx = SimpleNamespace(current_num_replicas=2, target_num_replicas=2, total_num_requests=1.0,
                          aggregated_metrics={STAGE_CALLS: {"r1": 4.0, "r2": 3.0}},
                          config=SimpleNamespace(get_target_ongoing_requests=lambda: 2.0))
    assert stage_load_policy(ctx) == (4.0, {})  # (1 + 4 + 3) / 2
    assert stage_load_policy(SimpleNamespace(**{**vars(ctx), "current_num_replicas": 0}))[0] == 2


# ---- a running deployment -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_ckpt):
    """deploy/local.yaml on a fresh local Ray cluster, with two Talker replicas, exporting traces to a real OTLP
    receiver (`.otlp`) through Serve's own tracing."""
    config = serve_cmd.load_config(CONFIGS[0], model=tiny_ckpt)
    talker = next(app for app in config.applications if app.name == "talker")
    talker.deployments[0].num_replicas = 2
    with OTLPReceiver() as otlp, deployed(config, env=otlp.env()) as running:
        running.otlp = otlp
        yield running


async def test_every_route_is_healthy(cluster):
    async with grpc.aio.insecure_channel(cluster.address) as proxy:
        for app, service in SERVICES.items():
            answer = await health_pb2_grpc.HealthStub(proxy).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAMES[service]), metadata=(("application", app),),
                timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, app
    for app, service in SERVICES.items():
        if app == "omni":  # the gateway's route is the proxy only
            continue
        addresses = await asyncio.to_thread(replica_addresses, app)
        assert len(addresses) == (2 if app == "talker" else 1)
        for address in addresses:
            async with stage_channel(address) as channel:  # as peers call: mutual TLS
                answer = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAMES[service]), timeout=30)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING, (app, address)
                if app == "hooks":
                    info = await hooks_pb2_grpc.HooksStub(channel).Describe(hooks_pb2.DescribeRequest(), timeout=30)
                    # deploy/local.yaml's chain
                    assert list(info.filters) == [] and info.tools_json == "" and info.max_tool_steps == 4


def _turn(speaker: str = "ethan", max_new_tokens: int = MAX_NEW_TOKENS, max_audio_frames: int = MAX_FRAMES):
    config = omni_pb2.ConverseConfig(speaker=speaker, max_new_tokens=max_new_tokens,
                                     max_audio_frames=max_audio_frames,
                                     thinker_sampling=common_pb2.SamplingParams(greedy=True))
    return [omni_pb2.ConverseRequest(config=config), omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text=TEXT)),
            omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn())]


def _converse_call(channel: grpc.aio.Channel, requests) -> grpc.aio.StreamStreamCall:
    # Several applications share Serve's proxy: the metadata picks the gateway's; the local key authenticates.
    return omni_pb2_grpc.OmniStub(channel).Converse(iter(requests), metadata=OmniClient("").metadata, timeout=120)


async def _converse(address: str, **turn) -> tuple[omni_pb2.TurnSummary, bytes]:
    pcm, summary = bytearray(), None
    async with grpc.aio.insecure_channel(address) as channel:
        async for msg in _converse_call(channel, _turn(**turn)):
            kind = msg.WhichOneof("kind")
            if kind == "audio":
                pcm += msg.audio.pcm16
            elif kind == "summary":
                summary = msg.summary
    return summary, bytes(pcm)


@pytest.fixture(scope="module")
def in_process(tiny_ckpt):
    """The same turn conducted in this process over the engines: what every route must reproduce."""
    from services.conductor import Conductor, TurnRequest
    from services.engines.bundle import Engines
    from services.events import AudioChunk, TurnSummary
    from services.stages import Stages
    from services.turn_parts import text_part

    async def run():
        conductor = Conductor(Stages.local(Engines.load(tiny_ckpt)))
        pcm, summary = bytearray(), None
        async for event in conductor.run(TurnRequest(parts=[text_part(TEXT)], max_new_tokens=MAX_NEW_TOKENS,
                                                     max_audio_frames=MAX_FRAMES)):
            if isinstance(event, AudioChunk):
                pcm += event.pcm16
            elif isinstance(event, TurnSummary):
                summary = event
        return summary, bytes(pcm)

    return asyncio.run(run())


@pytest.fixture(scope="module")
def local_stages(tiny_ckpt):
    from services.engines.bundle import Engines
    from services.stages import Stages

    return Stages.local(Engines.load(tiny_ckpt))


@pytest.mark.parametrize("inputs", [INPUTS["audio"], INPUTS["image"]], ids=["audio", "image"])
def test_chat_through_serve_equals_generate(cluster, local_stages, media, tmp_path, inputs):
    check_chat_equals_generate(cluster.address, local_stages, media, tmp_path, inputs)


def test_two_turn_session_through_serve(cluster, local_stages, media, tmp_path):
    check_two_turn_session(cluster.address, local_stages, media, tmp_path, "serve-two-turns")


def test_four_concurrent_streams_through_serve(cluster, media):
    check_four_concurrent_streams(cluster.address, media)


def _assert_same_turn(got: tuple[omni_pb2.TurnSummary, bytes], want) -> None:
    summary, pcm = got
    assert list(summary.thinker_token_ids) == want[0].thinker_token_ids
    assert [list(f.codes) for f in summary.codes] == want[0].codes
    assert summary.num_samples == want[0].num_samples > 0
    assert pcm == want[1]


async def test_converse_through_the_gateway_equals_in_process(cluster, in_process):
    _assert_same_turn(await _converse(cluster.address), in_process)
    # The text went through the hooks application: its replica recorded the turn's hook metrics.
    deadline, lines = time.monotonic() + 60, []
    while not lines and time.monotonic() < deadline:
        await asyncio.sleep(1)
        body = await asyncio.to_thread(_scrape, cluster.metrics_port)
        lines = [line for line in body.splitlines()
                 if line.startswith("ray_omni_hook_time_to_first_release_seconds_count") and "Hooks" in line]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) >= 1, lines


async def test_two_talker_replicas_share_turns_with_unchanged_results(cluster, in_process):
    for got in await asyncio.gather(_converse(cluster.address), _converse(cluster.address)):
        _assert_same_turn(got, in_process)
    # Each replica's stage metrics carry its replica label on Ray's Prometheus endpoint.
    deadline, replicas = time.monotonic() + 60, set()
    while len(replicas) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(1)
        body = await asyncio.to_thread(_scrape, cluster.metrics_port)
        replicas = {m.group(1) for line in body.splitlines()
                    if line.startswith("ray_omni_stage_ttft_seconds_count") and 'stage="talker"' in line
                    and (m := re.search(r'replica="([^"]+)"', line))}
    assert len(replicas) == 2, replicas


async def test_concurrent_turns_share_engine_steps_with_unchanged_results(cluster):
    """Six turns at once through the deployment equal the same turn alone, and the Thinker's, the Talkers' and
    Code2Wav's steps carried several of them at a time (on Ray's Prometheus endpoint)."""
    turn = dict(max_new_tokens=24, max_audio_frames=60)
    alone = await _converse(cluster.address, **turn)
    assert len(alone[0].codes) > 10
    before = await _settled_batch_sizes(cluster.metrics_port)
    for got in await asyncio.gather(*(_converse(cluster.address, **turn) for _ in range(6))):
        assert list(got[0].thinker_token_ids) == list(alone[0].thinker_token_ids)
        assert [list(f.codes) for f in got[0].codes] == [list(f.codes) for f in alone[0].codes] and got[1] == alone[1]
    after = await _settled_batch_sizes(cluster.metrics_port, changed_from=before)
    for stage in ("thinker", "talker", "code2wav"):  # the talker's two replicas summed: ~3 turns each
        rows, steps = (after[stage][i] - before[stage][i] for i in (0, 1))
        assert steps > 0 and rows / steps > 1.2, (stage, rows, steps)


async def _settled_batch_sizes(port: int, changed_from: dict | None = None) -> dict[str, tuple[float, float]]:
    """stage -> (rows, steps) of the batching stages over every replica, once Ray's export has caught up: two
    scrapes a report interval apart agree (and differ from `changed_from`)."""
    def read() -> dict[str, tuple[float, float]]:
        return batch_counts(_scrape(port))

    deadline, last = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        now = await asyncio.to_thread(read)
        if now == last and now != changed_from:
            return now
        last = now
        await asyncio.sleep(2)
    raise AssertionError(f"the batch-size metrics did not settle: {last}")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


async def test_errors_keep_their_status_through_the_proxy(cluster):
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as bad_speaker:
            async for _ in _converse_call(channel, _turn(speaker="nobody")):
                pass
        assert bad_speaker.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown speaker" in bad_speaker.value.details()


async def test_the_deployed_gateway_authenticates_and_keeps_slots_for_others(cluster, in_process):
    """Authentication is the deployed default (the local key, as `omni serve` creates it); 17 streams of one
    principal that never finish their turn take its 16 slots and the 17th to arrive is refused at once, while another
    principal's turn is served (its key added to the key file while the deployment runs)."""
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        for metadata in [GATEWAY_METADATA, GATEWAY_METADATA + call_credentials("omni_wrong")]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in omni_pb2_grpc.OmniStub(channel).Converse(iter(_turn()), metadata=metadata, timeout=30):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stuck = []
        for _ in range(17):
            call = omni_pb2_grpc.OmniStub(channel).Converse(metadata=OmniClient("").metadata, timeout=60)
            await call.write(_turn()[0])  # the config, then silence
            stuck.append(call)
        # Serve's proxy hands the 17 new calls to the gateway concurrently, so which one it admits last is not the
        # order they were opened in: exactly one of them is refused.
        first = await asyncio.gather(*(call.read() for call in stuck), return_exceptions=True)
        over = [msg for msg in first if isinstance(msg, grpc.aio.AioRpcError)]
        assert sum(not isinstance(msg, Exception) and msg.WhichOneof("kind") == "started" for msg in first) == 16
        assert len(over) == 1, first
        assert over[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "16 turns of yours" in over[0].details()
        other = auth.new_key()
        keys = Path(os.environ[auth.KEYS_FILE_ENV])
        keys.write_text(keys.read_text() + f"{auth.hash_key(other)} other-tenant\n")
        await asyncio.sleep(auth.RELOAD_CHECK_S + 0.5)
        pcm, summary = bytearray(), None
        async for msg in omni_pb2_grpc.OmniStub(channel).Converse(
                iter(_turn()), metadata=GATEWAY_METADATA + call_credentials(other), timeout=120):
            if msg.WhichOneof("kind") == "audio":
                pcm += msg.audio.pcm16
            summary = msg.summary if msg.WhichOneof("kind") == "summary" else summary
        _assert_same_turn((summary, bytes(pcm)), in_process)
        for call in stuck:
            call.cancel()


async def test_the_proxy_refuses_a_message_over_the_stage_limit(cluster, in_process):
    """Serve's proxy takes 2 GiB messages by default; the cluster env holds it to the stages' limit, so an oversized
    message never reaches a gateway replica (which would answer INVALID_ARGUMENT: a first message that is no config)."""
    big = omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(encoded=bytes(MAX_MESSAGE_BYTES + 1)))
    async with grpc.aio.insecure_channel(cluster.address, options=[("grpc.max_send_message_length", -1)]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in _converse_call(channel, [big]):
                pass
    assert_rejected_for_size(error.value)
    _assert_same_turn(await _converse(cluster.address), in_process)  # still serving


async def test_invalid_utf8_and_ten_mb_of_text_get_their_status_through_the_proxy(cluster, in_process):
    """The proxy deserializes before the gateway sees a message: invalid UTF-8 in a text part is still
    INVALID_ARGUMENT naming it (services.wire.omni_api). Ten 1 MiB text parts pass every per-message limit; their
    conversation would reach the hooks stage as one message over its limit: RESOURCE_EXHAUSTED saying so."""
    config = _turn()[0]
    bad = omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="ab")).SerializeToString().replace(b"ab", b"\xff\xfe")
    end = omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn())
    text_mb = omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="a" * (1 << 20)))
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        raw = channel.stream_stream("/omni.v1.Omni/Converse", request_serializer=bytes,
                                    response_deserializer=omni_pb2.ConverseResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as utf8:
            async for _ in raw(iter([config.SerializeToString(), bad, end.SerializeToString()]),
                               metadata=OmniClient("").metadata, timeout=60):
                pass
        with pytest.raises(grpc.aio.AioRpcError) as ten_mb:
            async for _ in _converse_call(channel, [config, *[text_mb] * 10, end]):
                pass
    assert utf8.value.code() == grpc.StatusCode.INVALID_ARGUMENT, utf8.value
    assert utf8.value.details().startswith("a text part is not valid UTF-8: field text.text")
    assert ten_mb.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, ten_mb.value
    assert "the request to the hooks stage would be one message of" in ten_mb.value.details()
    _assert_same_turn(await _converse(cluster.address), in_process)  # still serving


async def test_a_client_that_disconnects_frees_every_stage(cluster):
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        call = _converse_call(channel, _turn(max_new_tokens=64, max_audio_frames=2000))
        async for msg in call:
            if msg.WhichOneof("kind") == "audio":
                break
        assert await asyncio.to_thread(_stage_calls, "code2wav") == 1  # the turn is still speaking
        call.cancel()
    stages = [app for app in SERVICES if app != "omni"]
    deadline, busy = time.monotonic() + 30, None
    while busy != {} and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        loads = await asyncio.gather(*(asyncio.to_thread(_stage_calls, app) for app in stages))
        busy = {app: n for app, n in zip(stages, loads) if n}
    assert busy == {}


def _stage_calls(app: str) -> float:
    """The stage calls in progress over the app's replicas, as they report them to Serve's autoscaler."""
    from ray import serve

    answers = serve.get_app_handle(app).broadcast("record_autoscaling_stats").results(timeout_s=30)
    return sum(answer[STAGE_CALLS] for answer in answers)


async def test_a_served_turn_is_one_trace_across_every_stage(cluster, media):
    """The client's W3C traceparent goes in through Serve's proxy; every stage's span comes back to the OTLP
    receiver in that trace, under the gateway's turn span, with the turn's request and session ids."""
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    config = omni_pb2.ConverseConfig(session_id="traced", max_new_tokens=MAX_NEW_TOKENS,
                                     max_audio_frames=MAX_FRAMES,
                                     thinker_sampling=common_pb2.SamplingParams(greedy=True))
    requests = [omni_pb2.ConverseRequest(config=config),
                omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(encoded=Path(media["audio"]).read_bytes())),
                omni_pb2.ConverseRequest(image=omni_pb2.ImageInput(data=Path(media["image"]).read_bytes())),
                omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text=TEXT)),
                omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn())]
    request_id, frames = None, 0
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        call = omni_pb2_grpc.OmniStub(channel).Converse(iter(requests), timeout=120, metadata=(
            *OmniClient("").metadata, ("traceparent", f"00-{client_trace}-{client_span}-01")))
        async for msg in call:
            if msg.WhichOneof("kind") == "started":
                request_id = msg.started.request_id
            elif msg.WhichOneof("kind") == "summary":
                frames = len(msg.summary.codes)
    assert request_id and frames > 1
    stages = {"audio_encoder", "vision_encoder", "thinker", "hooks", "talker", "mtp", "code2wav"}

    def complete(spans) -> bool:
        names = [s.name for s in spans]
        return {"omni.turn", "thinker.prefill", "thinker.decode", *stages} <= set(names) \
            and names.count("mtp") == frames
    spans = await asyncio.to_thread(cluster.otlp.trace, bytes.fromhex(client_trace), complete)
    assert complete(spans), sorted(s.name for s in spans)
    by_id = {s.span_id: s for s in spans}

    def attrs(span) -> dict:
        return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}

    def chain(span) -> list:
        out = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            out.append(span)
        return out

    (turn,) = [s for s in spans if s.name == "omni.turn"]
    assert attrs(turn)["omni.request_id"] == request_id and attrs(turn)["omni.session_id"] == "traced"
    # Up from the turn: Serve's replica and proxy spans, the topmost one the client's child.
    assert (chain(turn) or [turn])[-1].parent_span_id == bytes.fromhex(client_span)
    assert any(s.name.startswith("replica_handle_request") for s in chain(turn)), [s.name for s in chain(turn)]
    replicas = {}
    for span in spans:
        a = attrs(span)
        if "omni.stage" not in a or span.name.endswith(".step"):  # a step is batched across requests
            continue
        assert turn in chain(span), (span.name, [s.name for s in chain(span)])
        assert a["omni.request_id"] == request_id and a["omni.session_id"] == "traced", span.name
        replicas.setdefault(a["omni.stage"], set()).add(a["omni.replica"])
    assert set(replicas) == stages
    # Each stage ran on its own replica (its id in the span), the turn in the gateway's.
    assert len({r for rs in replicas.values() for r in rs} | {attrs(turn)["omni.replica"]}) == len(stages) + 1
    assert all(chain(s)[0].name == "talker" for s in spans if s.name == "mtp")


async def test_probes_need_no_application_metadata(cluster):
    """What the Kubernetes probes and load balancers call (k8s/, docs/kubernetes.md): Serve's HTTP health route
    and its gRPC Healthz, neither of which needs the `application` metadata that grpc.health.v1 does here."""
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.http_port}/-/healthz", timeout=10) as response:
        assert response.status == 200
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        answer = await serve_pb2_grpc.RayServeAPIServiceStub(channel).Healthz(serve_pb2.HealthzRequest(), timeout=30)
        assert answer.message == "success"
        with pytest.raises(grpc.aio.AioRpcError) as no_app:  # why the probes use the two above
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert no_app.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_one_node_cluster_advertises_every_placement_class():
    """deploy/gpu.yaml places deployments by node class (k8s/ worker groups advertise them); `omni serve` on one
    machine must offer them all, or those replicas would never start."""
    asked = {name for app in serve_cmd.load_config(CONFIGS[1]).applications for d in app.deployments
             for name in d.model_dump(exclude_unset=True)["ray_actor_options"].get("resources", {})}
    assert asked >= {"omni_thinker_gpu", "omni_stage_gpu", "omni_cpu"}
    assert set(serve_cmd.placement_resources(serve_cmd.load_config(CONFIGS[1]))) == asked
    assert serve_cmd.placement_resources(serve_cmd.load_config(CONFIGS[0])) == {}
