"""A real OTLP trace receiver on loopback: the `opentelemetry.proto.collector.trace.v1.TraceService` that
exporters send spans to, keeping every span it gets."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class OTLPReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans: list = []  # opentelemetry.proto.trace.v1.Span, with `.service` (the resource's service.name)
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def env(self) -> dict[str, str]:
        """The OTEL_* variables that send a process's traces here, exported within about a second."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}", "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_SERVICE_NAME": "omni-serve-test"}

    def trace(self, trace_id: bytes, until, timeout_s: float = 60.0) -> list:
        """The spans of one trace, once `until(spans)` holds (exporters batch) or the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spans = [s for s in self.spans if s.trace_id == trace_id]
            if until(spans) or time.monotonic() > deadline:
                return spans
            time.sleep(0.5)

    def __enter__(self) -> OTLPReceiver:
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop(None)
