"""Prometheus metrics of every stage and of the gateway.

Inside Ray (a Serve replica) the metrics go through `ray.serve.metrics`, which adds the deployment, replica and
application labels and exports them on Ray's Prometheus endpoint (`omni serve --metrics-port`); one HTTP port per
process would not scale with replicas. Outside Ray (tests, `omni generate`) the same names go to
prometheus_client's default registry, so they can be read in-process.

Names follow Prometheus conventions (DESIGN.md section 6): `omni_` prefix, base units, `_seconds`, `_total`.
"""

from __future__ import annotations

import threading
import time

from services import tracing

# vLLM-style time-to-first-token buckets, 1 ms .. minutes.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0]
# Per-item latency: dense around the 80 ms audio frame budget.
ITEM_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12,
                0.16, 0.25, 0.5, 1.0, 2.5]
GAUGE_REFRESH_S = 1.0  # Ray drops a gauge after two report intervals: 10 s by default, 1 s in the tests
RTF_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0]


class _Histogram:
    def __init__(self, name: str, doc: str, buckets: list[float], labels: tuple[str, ...]):
        self.name, self.doc, self.buckets, self.labels = name, doc, buckets, labels
        self._ray = None
        self._prom = None

    def observe(self, value: float, **tags: str) -> None:
        _backend(self).observe(value, **tags)


class _Counter:
    def __init__(self, name: str, doc: str, labels: tuple[str, ...]):
        self.name, self.doc, self.labels = name, doc, labels
        self._ray = None
        self._prom = None

    def inc(self, value: float = 1.0, **tags: str) -> None:
        _backend(self).inc(value, **tags)


class _Gauge:
    """Ray drops a gauge value that is not set again within two report intervals, so inside Ray the last value of
    each label set is set again every GAUGE_REFRESH_S (from the event loop that set it): an idle replica reads 0,
    not nothing."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...]):
        self.name, self.doc, self.labels = name, doc, labels
        self._ray = None
        self._prom = None
        self._last: dict[tuple, float] = {}
        self._refresher = None

    def set(self, value: float, **tags: str) -> None:
        backend = _backend(self)
        backend.set(value, **tags)
        if backend is self._ray:
            self._last[tuple(sorted(tags.items()))] = value
            if self._refresher is None:
                import asyncio

                self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(GAUGE_REFRESH_S)
            for tags, value in list(self._last.items()):
                self._ray.set(value, **dict(tags))


class _RayMetric:
    def __init__(self, metric, kind: str):
        self.metric, self.kind = metric, kind

    def observe(self, value: float, **tags: str) -> None:
        self.metric.observe(value, tags=tags)

    def inc(self, value: float = 1.0, **tags: str) -> None:
        self.metric.inc(value, tags=tags)

    def set(self, value: float, **tags: str) -> None:
        self.metric.set(value, tags=tags)


class _PromMetric:
    def __init__(self, metric):
        self.metric = metric

    def observe(self, value: float, **tags: str) -> None:
        (self.metric.labels(**tags) if tags else self.metric).observe(value)

    def inc(self, value: float = 1.0, **tags: str) -> None:
        (self.metric.labels(**tags) if tags else self.metric).inc(value)

    def set(self, value: float, **tags: str) -> None:
        (self.metric.labels(**tags) if tags else self.metric).set(value)


_lock = threading.Lock()


def _backend(m: _Histogram | _Counter | _Gauge):
    """Create the real metric on first use, in the process that records it (a replica, or a plain process)."""
    import ray

    with _lock:
        if ray.is_initialized():
            if m._ray is None:
                from ray.serve import metrics as serve_metrics

                if isinstance(m, _Histogram):
                    m._ray = _RayMetric(serve_metrics.Histogram(m.name, m.doc, boundaries=m.buckets,
                                                                tag_keys=m.labels), "histogram")
                elif isinstance(m, _Gauge):
                    m._ray = _RayMetric(serve_metrics.Gauge(m.name, m.doc, tag_keys=m.labels), "gauge")
                else:
                    m._ray = _RayMetric(serve_metrics.Counter(m.name, m.doc, tag_keys=m.labels), "counter")
            return m._ray
        if m._prom is None:
            import prometheus_client as prom

            if isinstance(m, _Histogram):
                m._prom = _PromMetric(prom.Histogram(m.name, m.doc, m.labels, buckets=m.buckets))
            elif isinstance(m, _Gauge):
                m._prom = _PromMetric(prom.Gauge(m.name, m.doc, m.labels))
            else:
                # prometheus_client appends _total itself.
                m._prom = _PromMetric(prom.Counter(m.name.removesuffix("_total"), m.doc, m.labels))
        return m._prom


STAGE_TTFT = _Histogram("omni_stage_ttft_seconds", "Time from a stage's request to its first output",
                        TTFT_BUCKETS, ("stage",))
STAGE_ITEM = _Histogram("omni_stage_item_seconds", "Time a stage spends on one output item (token, frame, chunk)",
                        ITEM_BUCKETS, ("stage",))
STAGE_QUEUE = _Histogram("omni_stage_queue_seconds", "Time a stage's work waited for its engine",
                         ITEM_BUCKETS, ("stage",))
STAGE_BATCH = _Histogram("omni_stage_batch_size", "Items per engine call", [1, 2, 4, 8, 16, 32, 64], ("stage",))
# The exact mean batch is rate(rows) / rate(step count): Ray exports a histogram's _sum from bucket midpoints.
STAGE_ROWS = _Counter("omni_stage_batch_rows_total", "Items (requests' steps, frames) run by a stage's engine steps",
                      ("stage",))
STAGE_STEP = _Histogram("omni_stage_step_seconds", "Time of one engine step of a batching stage (all its items)",
                        ITEM_BUCKETS, ("stage",))
PREFIX_TOKENS = _Counter("omni_stage_prompt_tokens_total", "Prompt positions the Thinker or the Talker took from KV "
                         "its replica kept (kind=reused) or prefilled (kind=prefilled)", ("stage", "kind"))
PREFIX_REDOS = _Counter("omni_thinker_prefix_redos_total", "Prompts whose kept KV ended at a medium it holds with "
                        "other content (a streamed audio's window whose log-mel features a louder moment changed), "
                        "prefilled again from there", ())
LIVE_PREFILLS = _Counter("omni_live_prefills_total", "Prefills of a turn's input while it still streamed in "
                         "(services.live_input)", ())
LIVE_CATCH_UPS = _Counter("omni_live_catch_ups_total", "Live prefills of all of a streaming audio so far, its "
                          "partial window too, after a louder moment raised the clamp of the windows prefilled "
                          "(services.live_input)", ())
STAGE_ERRORS = _Counter("omni_stage_errors_total", "Requests a stage ended with an error, by gRPC status name",
                        ("stage", "code"))
STAGE_ONGOING = _Gauge("omni_stage_ongoing", "Stage calls in progress on a replica", ("stage",))
STAGE_FAILOVERS = _Counter("omni_stage_failovers_total", "Stage calls run again on another replica after theirs "
                           "became unavailable, by stage application", ("app",))
ONGOING_TURNS = _Gauge("omni_ongoing_turns", "Turns in progress on a gateway", ())
REFUSALS = _Counter("omni_gateway_refusals_total", "Calls a gateway refused before their turn, by reason "
                    "(unauthenticated, gateway_full, principal_limit, input_idle)", ("reason",))
PRINCIPAL_TURNS = _Counter("omni_principal_turns_total", "Turns admitted per principal (the first "
                           "MAX_PRINCIPAL_LABELS principals of a replica; later ones count as 'other')", ("principal",))
MAX_PRINCIPAL_LABELS = 100  # API-key tenants are few; a JWT issuer's users may be many: bound the series
SESSION_ERRORS = _Counter("omni_session_errors_total", "Session store operations that failed (e.g. Redis down)",
                          ("op",))
TIME_TO_FIRST_TEXT = _Histogram("omni_time_to_first_text_seconds", "Turn start to the first text delta",
                                TTFT_BUCKETS, ())
TIME_TO_FIRST_AUDIO = _Histogram("omni_time_to_first_audio_seconds", "Turn start to the first audio packet",
                                 TTFT_BUCKETS, ())
REAL_TIME_FACTOR = _Histogram("omni_rtf", "Turn wall time / seconds of audio produced", RTF_BUCKETS, ())


class StageTimer:
    """One stage call of one request: its time to first output, then the time of each further item, its errors by
    gRPC status, and its trace span (`services.tracing`; `span` is the parent of the call's inner spans).

    `first=False` is a call that continues a request (MTP answers each of a request's frames in its own call): its
    output is an item, not the request's first."""

    def __init__(self, stage: str, *, first: bool = True):
        self.stage = stage
        self.start = self.last = time.perf_counter()
        self.first = first
        self.items = 0
        self.span = tracing.start_span(stage, stage=stage, request_id=tracing.REQUEST_ID.get())

    def output(self, n: int = 1) -> None:
        now = time.perf_counter()
        if self.first:
            STAGE_TTFT.observe(now - self.start, stage=self.stage)
            self.span.set_attribute("omni.first_output_s", now - self.start)
            self.first = False
        else:
            STAGE_ITEM.observe((now - self.last) / max(n, 1), stage=self.stage)
        self.last = now
        self.items += n

    def error(self, exc: BaseException) -> None:
        from services.servicers.status import status_of

        STAGE_ERRORS.inc(stage=self.stage, code=status_of(exc)[0].name)

    def __enter__(self) -> StageTimer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Count an error the stage raised; not a cancellation or a closed stream (the caller went away)."""
        if isinstance(exc, Exception):
            self.error(exc)
        self.span.set_attribute("omni.items", self.items)
        tracing.end_span(self.span, exc)


def record_turn(timings: dict[str, float]) -> None:
    """The gateway's per-turn metrics from a TurnSummary's timings."""
    if "time_to_first_text_s" in timings:
        TIME_TO_FIRST_TEXT.observe(timings["time_to_first_text_s"])
    if "time_to_first_audio_s" in timings:
        TIME_TO_FIRST_AUDIO.observe(timings["time_to_first_audio_s"])
    if "rtf" in timings:
        REAL_TIME_FACTOR.observe(timings["rtf"])
