"""OpenTelemetry traces: one trace per turn, a span per stage call, the context carried on every gRPC hop.

    omni.turn (gateway: conductor)                     request_id, session_id, finish_reason, time to first audio
    ├── audio_encoder / vision_encoder                 (the stage replica's span, under its gRPC server span)
    ├── thinker ── thinker.prefill, thinker.decode
    ├── hooks
    ├── talker ── talker.prefill, mtp (one span per frame, on the MTP replica)
    └── code2wav

Off by default. The standard variables turn it on: `OTEL_TRACES_EXPORTER=otlp` (or `console`), or an OTLP endpoint
(`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); the OTLP exporter, sampler
(`OTEL_TRACES_SAMPLER`), resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) and batching (`OTEL_BSP_*`)
read the rest of them. `OTEL_SDK_DISABLED=true` wins over everything.

Who owns the tracer provider:
- In a Ray Serve cluster, Serve's own tracing does (Ray 2.60): `serve_cmd.cluster_env` points
  `RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH` at `serve_span_processors` below, so the proxy and every replica export
  through OTLP, the proxy continues a client's W3C `traceparent`, and the gateway's turn span is the child of
  Serve's replica span.
- Elsewhere (`omni generate`, a bare gateway, tests) `setup()` installs one.

Propagation uses OpenTelemetry's own propagators (W3C trace context and baggage): stage clients `inject` the
current context into each call's metadata, stage servers continue it through opentelemetry-instrumentation-grpc's
server interceptor. The session id rides in baggage, so every stage span can carry it. MTP frames share one stream
per Talker replica across requests, so each frame carries its request's context in the message itself.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

from opentelemetry import baggage, context, propagate, trace
from opentelemetry.trace import Span, Status, StatusCode

TRACER_NAME = "omni-serve"
SESSION_KEY = "omni.session_id"
SERVE_EXPORTER = "services.tracing:serve_span_processors"
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_lock = threading.Lock()
_installed = False

# The turn being served, for logs and spans. The conductor sets it for its turn's tasks; stage servicers set it from
# their `start` message (MTP from each frame); stage clients send it on every call they make from that context.
REQUEST_ID: ContextVar[str] = ContextVar("omni_request_id", default="")


def request_id() -> str:
    """The current turn's id, or a fresh one when nothing set it."""
    return REQUEST_ID.get() or uuid.uuid4().hex


def configured(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").lower()
    if exporter == "none":
        return False
    return exporter in ("otlp", "console") or any(env.get(k) for k in _ENDPOINTS)


def _span_exporter():
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, TLS and timeout from OTEL_EXPORTER_OTLP_*


def serve_span_processors() -> list:
    """Ray Serve's tracing exporter hook (`RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`): export over OTLP."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(_span_exporter())]


def setup() -> bool:
    """Install an OTLP-exporting tracer provider once per process when the environment asks for traces and no SDK
    provider is installed yet (Serve installs its own in a replica). Returns whether traces are recorded."""
    global _installed
    if not configured():
        return False
    with _lock:
        if _installed or _has_sdk_provider():
            return True
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get(
            "OTEL_SERVICE_NAME", "omni-serve")}))
        for processor in serve_span_processors():
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        _installed = True
    return True


def _has_sdk_provider() -> bool:
    from opentelemetry.sdk.trace import TracerProvider

    return isinstance(trace.get_tracer_provider(), TracerProvider)


def flush(timeout_ms: int = 5000) -> None:
    """Export what is buffered (a command that exits right after its turn)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush(timeout_ms)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


@functools.cache
def replica() -> str:
    """This process's name in spans: the Serve replica id, or host:pid outside Serve."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not in a Serve replica
        return f"{socket.gethostname()}:{os.getpid()}"


def start_span(name: str, *, stage: str | None = None, parent: Span | None = None,
               ctx: context.Context | None = None, request_id: str = "", **attributes) -> Span:
    """A span under `parent`, or in `ctx`, or the current context; not made current: stage calls are async
    generators, whose bodies run in their consumer's context, so attaching across a `yield` would leak into it."""
    if parent is not None:
        ctx = trace.set_span_in_context(parent, ctx)
    span = tracer().start_span(name, context=ctx)
    if span.is_recording():
        if request_id:
            span.set_attribute("omni.request_id", request_id)
        if session := baggage.get_baggage(SESSION_KEY, ctx):
            span.set_attribute("omni.session_id", str(session))
        if stage:
            span.set_attribute("omni.stage", stage)
        span.set_attribute("omni.replica", replica())
        for key, value in attributes.items():
            span.set_attribute(f"omni.{key}", value)
    return span


def end_span(span: Span, error: BaseException | None = None) -> None:
    if error is not None and isinstance(error, Exception):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"[:300]))
    span.end()


@contextmanager
def current(span: Span | None = None, ctx: context.Context | None = None) -> Iterator[None]:
    """`span` (or `ctx`) as the current context for a block with no `yield` inside, e.g. one stage call."""
    token = context.attach(trace.set_span_in_context(span, ctx) if span is not None else ctx)
    try:
        yield
    finally:
        context.detach(token)


def turn_context(session_id: str, parent: context.Context | None = None) -> context.Context:
    """The context a turn's stage calls run in: `parent` (or the current one) plus the session id as baggage."""
    ctx = parent if parent is not None else context.get_current()
    return baggage.set_baggage(SESSION_KEY, session_id, ctx) if session_id else ctx


def carrier() -> dict[str, str]:
    """The current context as a string map (W3C `traceparent`, `tracestate`, `baggage`): what a message that
    carries its own context holds (MTP frames)."""
    out: dict[str, str] = {}
    propagate.inject(out)
    return out


def metadata() -> tuple[tuple[str, str], ...]:
    """The current context as gRPC metadata."""
    return tuple(carrier().items())


def extract(pairs) -> context.Context | None:
    """The remote context in gRPC metadata or a string map; None when it holds none."""
    carrier = {k.lower(): v for k, v in (pairs.items() if isinstance(pairs, Mapping) else pairs or ())
               if isinstance(v, str)}
    if "traceparent" not in carrier:
        return None
    return propagate.extract(carrier)


def server_interceptors() -> list:
    """opentelemetry-instrumentation-grpc's server interceptor for a stage server: it continues the caller's
    context for the handler. MTP's shared stream (its frames carry their own context) and the health and
    reflection services are left out: a span for them would stand for no turn."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.any_of(
        filters.service_prefix("omni.v1.MTP"), filters.service_prefix("grpc.health"),
        filters.service_prefix("grpc.reflection"))))]
