"""Ray Serve applications: one per stage plus the gateway. A Serve config (`deploy/*.yaml`) names each builder
below with its `args` and sets each deployment's resources, replicas and autoscaling.

    client ── Omni/Converse ──> Serve's gRPC proxy ──> omni: Gateway ── conducts each turn ──┐
                                                                                            │ direct gRPC to a
        audio: AudioEncoder   vision: VisionEncoder   thinker: Thinker   hooks: Hooks       <┤ replica's own port
        talker: Talker ── direct gRPC, every frame ──> mtp: MTP        code2wav: Code2Wav   <┘ (routes.py)

Serve's proxy serves the gateway's Omni service only (the configs' `grpc_servicer_functions` list Omni and
Health): the client's Converse takes that route: a turn sends a few messages in and ~13 audio packets a second out,
so the proxy's ~2 ms per message is noise, and in return every turn is a Serve request (one address for all
replicas, `max_ongoing_requests` backpressure, Serve's request metrics and autoscaling). Stage replicas answer
only `grpc.health.v1.Health/Check` through the proxy (the `application` metadata picks the app); their servicer
runs on their own port, with mutual TLS, and that is the route peers take (`services.serving.routes` says why;
docs/security.md why nothing else reaches it).

Builders only bind; weights load in the replicas (`model` is read there: `omni serve` makes it absolute). Serve
imports this module to run a builder, in a task per application: the replicas import torch and the engines in
their constructors, so that building costs ~2 s of imports instead of ~10.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any, Literal, NoReturn

import grpc
import ray
from grpc_health.v1 import health_pb2
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from ray.serve import Application

from services.auth import AuthConfig
from services.config import (
    CODE2WAV_BATCH_WAIT_MS,
    TALKER_BATCH_WAIT_MS,
    THINKER_BATCH_WAIT_MS,
    WARM_BATCH,
    KVConfig,
)
from services.errors import CheckpointError
from services.hooks.registry import HooksConfig
from services.metrics import STAGE_ONGOING
from services.serving.autoscaling import STAGE_CALLS
from services.wire.server import SERVICE_NAMES

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0  # after DRAIN_S, streams in flight get this long; keep graceful_shutdown_timeout_s above both
STAGES = ("audio", "vision", "thinker", "talker", "code2wav")  # services.remote.STAGE_KEYS, which imports torch
# The metrics' stage label of each stage service (services.stages names them so).
_STAGE_LABELS = {"AudioEncoder": "audio_encoder", "VisionEncoder": "vision_encoder", "Thinker": "thinker",
                 "Talker": "talker", "MTP": "mtp", "Code2Wav": "code2wav"}


# ---- builder arguments (a Serve config's `args`) --------------------------------------------------------------


class StageArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt arg in a config fails the deploy instead of vanishing

    model: str = Field(description="checkpoint directory (Hugging Face layout); a relative path is read from the "
                                   "replica's working directory")
    device: str = Field("cpu", description="torch device of the stage's weights, e.g. 'cpu' or 'cuda' (Ray "
                                           "assigns the replica its GPUs)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weight dtype")

    def engine_config(self):
        from services.config import EngineConfig

        return EngineConfig(device=self.device, dtype=self.dtype)


def _batch_wait_ms(default: float):
    """The `batch_wait_ms` arg, its default the stage's (`services/config.py`)."""
    return Field(default, ge=0, le=50, description="how long a step waits, at most, for the requests in progress whose "
                                                   "next item is not there yet (a request alone never waits); 0: steps "
                                                   "fill with what arrives while the previous one runs")


class StepArgs(StageArgs):
    """A stage that batches its requests' steps (`services.batching`) and replays the steps of each batch size from
    a trace (`services.engines.replay`): Thinker, Talker, MTP, Code2Wav."""

    max_batch: int = Field(64, ge=1, le=1024, description="most requests' steps (MTP: frames, of any requests from "
                                                         "any Talker) in one engine call")
    batch_wait_ms: float = _batch_wait_ms(0.0)
    warm_batch: int = Field(WARM_BATCH, ge=1, le=1024, description="batch sizes up to this (and max_batch) are "
                                                                  "traced at startup; a larger one's first step "
                                                                  "waits for its trace (services/config.py)")


class MTPArgs(StepArgs):
    max_batch: int = Field(32, ge=1, le=1024, description="most frames (of any requests, from any Talker) in one "
                                                         "engine step")


class DecoderArgs(StepArgs, KVConfig):
    """The Thinker's and the Talker's: a stage that keeps its requests' KV cache and batches their steps."""

    def kv_config(self) -> KVConfig:
        return KVConfig(**{name: getattr(self, name) for name in KVConfig.model_fields})


class ThinkerArgs(DecoderArgs):
    batch_wait_ms: float = _batch_wait_ms(THINKER_BATCH_WAIT_MS)


class TalkerArgs(DecoderArgs):
    mtp_app: str = Field("mtp", description="name of the MTP application the Talker calls every frame")
    batch_wait_ms: float = _batch_wait_ms(TALKER_BATCH_WAIT_MS)


class Code2WavArgs(StepArgs):
    batch_wait_ms: float = _batch_wait_ms(CODE2WAV_BATCH_WAIT_MS)


class HooksArgs(HooksConfig):
    """The hooks application: the chain (`services.hooks.HooksConfig`'s fields) and the checkpoint whose tokenizer
    and chat template it uses."""

    model: str = Field(description="checkpoint directory: the stage reads its processor (tokenizer, chat template)")


class SessionQuotas(BaseModel):
    """`services.sessions.Quotas`: per principal (tenant), so one cannot evict another's sessions."""

    model_config = ConfigDict(extra="forbid")

    max_sessions_per_owner: int = Field(64, gt=0, description="sessions a principal keeps; its oldest go first")
    max_bytes_per_owner: int = Field(512 << 20, gt=0, description="bytes (media, text) a principal keeps")
    max_session_bytes: int = Field(128 << 20, gt=0, description="bytes one session may hold; a turn that would "
                                                                "pass it is refused (RESOURCE_EXHAUSTED)")

    @model_validator(mode="after")
    def _session_fits_owner(self) -> SessionQuotas:
        if self.max_session_bytes > self.max_bytes_per_owner:
            raise ValueError("sessions.max_session_bytes must not exceed max_bytes_per_owner")
        return self


class GatewayArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint directory: the gateway reads its config and processor only")
    redis_url: str | None = Field(None, description="session store shared by gateway replicas, e.g. "
                                                    "redis://host:6379/0; unset: sessions live in each replica")
    stages: dict[str, str] = Field(default_factory=lambda: {stage: stage for stage in STAGES},
                                   description="stage application names by stage (audio, vision, thinker, talker, "
                                               "code2wav); without talker and code2wav answers are text only")
    hooks_app: str | None = Field(None, description="name of the hooks application, whose filters and tools run "
                                                    "between the Thinker and the Talker")
    hooks: dict | None = Field(None, description="instead of hooks_app: a chain run in the gateway itself "
                                                  "(services.hooks.HooksConfig); neither: release everything")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="client authentication (services.auth): on "
                                                                    "by default; API keys and/or JWTs")
    sessions: SessionQuotas = Field(default_factory=lambda: SessionQuotas(), description="what each principal may "
                                                                                        "keep in the session store")
    # Unset: OmniServicer's defaults.
    max_request_bytes: int | None = Field(None, gt=0, description="input bytes accepted per turn")
    max_decoded_pixels: int | None = Field(None, gt=0, description="pixels a turn's images and video frames may "
                                                                   "decode to, checked before decoding")
    max_decoded_samples: int | None = Field(None, gt=0, description="audio samples a turn's audio may decode to "
                                                                    "(frames x channels), checked before decoding")
    default_deadline_s: float | None = Field(None, gt=0, description="cap on a turn's duration")
    stage_timeout_s: float | None = Field(None, gt=0, description="longest wait for a stage's next output")
    input_idle_s: float | None = Field(None, gt=0, description="longest pause between a turn's input messages "
                                                               "before end_of_turn")
    max_turns: int | None = Field(None, gt=0, description="turns at once in a replica; more are refused at once "
                                                          "(keep the deployment's max_ongoing_requests above it)")
    max_turns_per_principal: int | None = Field(None, gt=0, description="turns at once per principal in a replica")
    live_prefill: bool | None = Field(None, description="prefill a turn into the Thinker while its input streams in "
                                                        "(services.live_input); default on")

    @model_validator(mode="after")
    def _one_hook_stage(self) -> GatewayArgs:
        if self.hooks_app is not None and self.hooks is not None:
            raise ValueError("set hooks_app (the hooks application) or hooks (a chain in the gateway), not both")
        return self


# ---- what every stage replica shares ----------------------------------------------------------------------------


class CountedStage:
    """A stage (`services.stages` object) whose calls in progress are counted. Peers call a replica's own port,
    past Serve's request counting, so this count is the replica's load for Serve's autoscaler."""

    def __init__(self, stage, name: str):
        self.stage = stage
        self.name = name  # the metrics' stage label
        self.ongoing = 0

    def __getattr__(self, name: str):
        attr = getattr(self.stage, name)
        if inspect.isasyncgenfunction(attr):
            return functools.partial(self._stream, attr)
        if inspect.iscoroutinefunction(attr):
            return functools.partial(self._call, attr)
        return attr

    async def _call(self, method, *args, **kwargs):
        self._count(1)
        try:
            return await method(*args, **kwargs)
        finally:
            self._count(-1)

    async def _stream(self, method, *args, **kwargs):
        self._count(1)
        try:
            async with aclosing(method(*args, **kwargs)) as items:
                async for item in items:
                    yield item
        finally:
            self._count(-1)

    def _count(self, delta: int) -> None:
        self.ongoing += delta
        STAGE_ONGOING.set(self.ongoing, stage=self.name)


class _StageReplica:
    """A stage replica: its servicer on its own port (the peers' route, mutual TLS with the cluster credential),
    its address for them (`grpc_address`, asked by `routes.ReplicaSet`), its load for Serve, health through the
    proxy, and a drained shutdown. It serves no stage method through Serve's proxy: stages are internal."""

    servicer: Any
    stage: CountedStage
    peers: tuple = ()  # the routes.ReplicaSets this replica calls (the Talker's MTP)

    async def _serve(self, stage, servicer_cls: Callable, *servicer_args) -> None:
        import torch

        # torch's default is a thread per core of the node: replicas sharing a node's CPUs would spin against each
        # other in OpenMP. A replica computes with the CPUs Ray gave it (at least one).
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))))
        self.stage = CountedStage(stage, _STAGE_LABELS[servicer_cls.service])
        await self._start(servicer_cls(self.stage, *servicer_args))

    async def _start(self, servicer) -> None:
        from services.servicers import serve_stage
        from services.wire import cluster_tls

        self.servicer = servicer
        credential = cluster_tls.for_replica()  # none (and no OMNI_CLUSTER_TLS=off): the replica fails to start
        # Only the address peers are given: not every interface of the node.
        host = ray.util.get_node_ip_address()
        self._server, port = await serve_stage(self.servicer, host=host, credential=credential)
        self._address = f"{host}:{port}"
        log.info("%s replica serving on %s (%s)", self.servicer.service, self._address,
                 "mutual TLS" if credential else "plaintext: OMNI_CLUSTER_TLS=off")

    def grpc_address(self) -> str:
        return self._address

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {STAGE_CALLS: self.stage.ongoing}

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        return _health(request, self.servicer.service, grpc_context)

    async def __del__(self):
        from services.serving.routes import DRAIN_S

        # Serve has stopped routing to this replica; peers drop it from their lists within DRAIN_S.
        await asyncio.sleep(DRAIN_S)
        if hasattr(self, "_server"):
            await self._server.stop(STOP_GRACE_S)
        for peer in self.peers:
            await peer.close()


@serve.deployment(name="AudioEncoder")
class AudioEncoderReplica(_StageReplica):
    async def __init__(self, args: StageArgs):
        from services.engines.audio_encoder import AudioEncoderEngine
        from services.servicers.audio_encoder import AudioEncoderServicer
        from services.stages import LocalAudioEncoder

        engine = await asyncio.to_thread(AudioEncoderEngine.from_checkpoint, args.model, args.engine_config())
        await self._serve(LocalAudioEncoder(engine), AudioEncoderServicer)


@serve.deployment(name="VisionEncoder")
class VisionEncoderReplica(_StageReplica):
    async def __init__(self, args: StageArgs):
        from services.engines.vision_encoder import VisionEncoderEngine
        from services.servicers.vision_encoder import VisionEncoderServicer
        from services.stages import LocalVisionEncoder

        engine = await asyncio.to_thread(VisionEncoderEngine.from_checkpoint, args.model, args.engine_config())
        await self._serve(LocalVisionEncoder(engine), VisionEncoderServicer)


@serve.deployment(name="Thinker")
class ThinkerReplica(_StageReplica):
    async def __init__(self, args: ThinkerArgs):
        from services.checkpoint.loading import Checkpoint
        from services.engines.thinker import ThinkerEngine
        from services.servicers.thinker import ThinkerServicer
        from services.stages import LocalThinker

        ckpt = Checkpoint.open(args.model)
        engine = await asyncio.to_thread(ThinkerEngine.from_checkpoint, ckpt, args.engine_config(),
                                         kv=args.kv_config())
        await asyncio.to_thread(engine.warm, min(args.warm_batch, args.max_batch))  # as MTP's, below
        await self._serve(LocalThinker(engine, args.max_batch, args.batch_wait_ms / 1000), ThinkerServicer,
                          thinker_stop_ids(ckpt))


@serve.deployment(name="Talker")
class TalkerReplica(_StageReplica):
    async def __init__(self, args: TalkerArgs):
        from services.engines.talker import TalkerEngine
        from services.remote import RemoteMTP
        from services.servicers.talker import TalkerServicer
        from services.serving.routes import ReplicaSet, RoutedMTP
        from services.stages import LocalTalker

        engine = await asyncio.to_thread(TalkerEngine.from_checkpoint, args.model, args.engine_config(),
                                         kv=args.kv_config())
        await asyncio.to_thread(engine.warm, min(args.warm_batch, args.max_batch))  # as MTP's, below
        mtp = ReplicaSet(args.mtp_app, RemoteMTP)  # one stream per MTP replica, shared by this replica's requests
        self.peers = (mtp,)
        await self._serve(LocalTalker(engine, RoutedMTP(mtp), args.max_batch, args.batch_wait_ms / 1000),
                          TalkerServicer)


@serve.deployment(name="MTP")
class MTPReplica(_StageReplica):
    async def __init__(self, args: MTPArgs):
        from services.engines.mtp import MTPEngine
        from services.servicers.mtp import MTPServicer
        from services.stages import LocalMTP

        engine = await asyncio.to_thread(MTPEngine.from_checkpoint, args.model, args.engine_config())
        # its frames' traces: not on the path of the first frames of each batch size
        await asyncio.to_thread(engine.warm, min(args.warm_batch, args.max_batch))
        await self._serve(LocalMTP(engine, args.max_batch, args.batch_wait_ms / 1000), MTPServicer)


@serve.deployment(name="Code2Wav")
class Code2WavReplica(_StageReplica):
    async def __init__(self, args: Code2WavArgs):
        from services.engines.code2wav import Code2WavEngine
        from services.servicers.code2wav import Code2WavServicer
        from services.stages import LocalCode2Wav

        engine = await asyncio.to_thread(Code2WavEngine.from_checkpoint, args.model, args.engine_config())
        # its steady frames' traces: not on the path of the first frames of each batch size
        await asyncio.to_thread(engine.warm, min(args.warm_batch, args.max_batch))
        await self._serve(LocalCode2Wav(engine, args.max_batch, args.batch_wait_ms / 1000), Code2WavServicer,
                          engine.sample_rate)


@serve.deployment(name="Hooks")
class HooksReplica(_StageReplica):
    """User code between the Thinker and the Talker: the gateway holds one Filter stream per turn (lockstep, one
    round trip per Thinker token) on a replica's own port, like the other stages."""

    async def __init__(self, args: HooksArgs):
        from services.checkpoint.loading import Checkpoint
        from services.hooks import build_chain
        from services.preprocess import load_processor
        from services.servicers.hooks import HooksServicer

        processor = await asyncio.to_thread(load_processor, Checkpoint.open(args.model).path)
        chain = build_chain(HooksConfig.model_validate(args.model_dump(exclude={"model"})))
        await self._start(HooksServicer(chain, processor))

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {STAGE_CALLS: self.servicer.active}


@serve.deployment(name="Gateway")
class GatewayReplica:
    """The client API. It loads no weights: the processor (preprocessing runs here) and the checkpoint's config."""

    async def __init__(self, args: GatewayArgs):
        from services.checkpoint.loading import Checkpoint
        from services.checkpoint.variant import detect_variant
        from services.engines.code2wav import SAMPLE_RATE
        from services.engines.prefix import AudioWindow
        from services.gateway import OmniServicer
        from services.hooks import build_chain
        from services.preprocess import load_processor
        from services.serving.routes import routed_stages
        from services.auth import build_authenticator
        from services.sessions import Quotas, make_session_store

        ckpt = Checkpoint.open(args.model)
        variant = detect_variant(ckpt)
        if not variant.speech and {"talker", "code2wav"} & set(args.stages):
            raise CheckpointError(f"{ckpt.path} is {variant.title}, which has no Talker: leave talker and code2wav "
                                  "out of the gateway's stages (and their applications out of the config)")
        log.info("gateway for %s: %s", ckpt.path, variant.describe())
        processor = await asyncio.to_thread(load_processor, ckpt.path)
        speakers = {name.lower(): sid for name, sid in ckpt.config.talker_config.speaker_id.items()}
        self.stages = routed_stages(args.stages, processor, speakers, thinker_stop_ids(ckpt), SAMPLE_RATE, variant,
                                    AudioWindow.of(ckpt.config.thinker_config.audio_config))
        self.sessions = make_session_store(args.redis_url, quotas=Quotas(**args.sessions.model_dump()))
        limits = args.model_dump(include={"max_request_bytes", "default_deadline_s", "stage_timeout_s", "input_idle_s",
                                          "max_turns", "max_turns_per_principal", "max_decoded_pixels",
                                          "max_decoded_samples", "live_prefill"}, exclude_none=True)
        self.hooks = None
        if args.hooks_app:
            from services.remote import RemoteHooks
            from services.serving.routes import ReplicaSet, RoutedHooks

            self.hooks = RoutedHooks(ReplicaSet(args.hooks_app, RemoteHooks))
        hooks = self.hooks or (build_chain(args.hooks) if args.hooks else None)
        self.servicer = OmniServicer(self.stages, self.sessions, hooks=hooks,
                                     authenticator=build_authenticator(args.auth), **limits)

    async def Converse(self, requests, grpc_context) -> AsyncIterator:
        async for msg in proxied(self.servicer.Converse, requests, grpc_context):
            yield msg

    async def Describe(self, request, grpc_context):
        return await self.servicer.Describe(request, _ProxyContext(None, grpc_context))

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        # What the deployment serves rides along as trailing metadata (Describe says it in full).
        variant = self.stages.variant
        grpc_context.set_trailing_metadata([("omni-variant", variant.kind),
                                            ("omni-output-modalities", ",".join(self.stages.output_modalities))])
        return _health(request, "Omni", grpc_context)

    async def __del__(self):
        from services.serving.routes import close_routed

        await close_routed(self.stages)
        if self.hooks is not None:
            await self.hooks.replicas.close()
        await self.sessions.close()


# ---- builders: `import_path: services.serving.apps:<name>` ------------------------------------------------------


def audio_encoder_app(args: dict) -> Application:
    return AudioEncoderReplica.bind(StageArgs.model_validate(args))


def vision_encoder_app(args: dict) -> Application:
    return VisionEncoderReplica.bind(StageArgs.model_validate(args))


def thinker_app(args: dict) -> Application:
    return ThinkerReplica.bind(ThinkerArgs.model_validate(args))


def talker_app(args: dict) -> Application:
    return TalkerReplica.bind(TalkerArgs.model_validate(args))


def mtp_app(args: dict) -> Application:
    return MTPReplica.bind(MTPArgs.model_validate(args))


def code2wav_app(args: dict) -> Application:
    return Code2WavReplica.bind(Code2WavArgs.model_validate(args))


def hooks_app(args: dict) -> Application:
    return HooksReplica.bind(HooksArgs.model_validate(args))


def gateway_app(args: dict) -> Application:
    return GatewayReplica.bind(GatewayArgs.model_validate(args))


# ---- helpers ----------------------------------------------------------------------------------------------------


def thinker_stop_ids(ckpt) -> frozenset[int]:
    # As services.engines.bundle: the reference stops the Thinker on <|im_end|> only.
    return frozenset({ckpt.config.im_end_token_id})


def _health(request: health_pb2.HealthCheckRequest, service: str, grpc_context) -> health_pb2.HealthCheckResponse:
    """grpc.health.v1 Check through Serve's proxy: a replica answers only once its weights are loaded."""
    if request.service not in ("", SERVICE_NAMES[service]):
        grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
        grpc_context.set_details(f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse()
    return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


_DONE = object()


async def proxied(method: Callable, requests, grpc_context) -> AsyncIterator:
    """Run a grpc.aio servicer method for a call through Serve's gRPC proxy: `requests` is Serve's request stream
    (`ray.serve.grpc_util.gRPCInputStream`); what the method yields or writes with `context.write` comes out here;
    its `context.abort` sets the status the proxy returns."""
    context = _ProxyContext(requests, grpc_context)
    call = method(requests, context)
    if inspect.isasyncgen(call):
        async with aclosing(call):
            async for msg in call:
                yield msg
        return

    async def run():
        try:
            await call
        finally:
            context.responses.put_nowait(_DONE)

    task = asyncio.ensure_future(run())
    try:
        while (msg := await context.responses.get()) is not _DONE:
            yield msg
        await task  # the method's error, if any
    finally:
        task.cancel()  # the client went away: the method cleans up on its cancellation
        await asyncio.gather(task, return_exceptions=True)


class _ProxyContext:
    """What the servicers use of grpc.aio.ServicerContext, for a call through Serve's gRPC proxy."""

    def __init__(self, requests, grpc_context):
        self._requests = requests
        self._grpc_context = grpc_context  # ray.serve.grpc_util.RayServegRPCContext
        self.responses: asyncio.Queue = asyncio.Queue()  # unbounded: write() never blocks the method's cleanup

    async def read(self):
        return await anext(self._requests, grpc.aio.EOF)

    async def write(self, message) -> None:
        self.responses.put_nowait(message)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        self._grpc_context.set_code(code)
        self._grpc_context.set_details(details)
        raise grpc.aio.AbortError(details)  # Serve returns the code set above for an exception

    def invocation_metadata(self):
        return self._grpc_context.invocation_metadata()

    def set_trailing_metadata(self, metadata) -> None:
        self._grpc_context.set_trailing_metadata(metadata)

    def time_remaining(self) -> None:
        # The proxy does not pass the client's deadline on; when it expires the proxy's call ends, which cancels
        # this request and runs the method's cleanup.
        return None
