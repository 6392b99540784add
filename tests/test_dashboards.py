"""The Grafana dashboards in dashboards/: static checks (they import as-is, every omni_ metric they name exists in
services/), then every panel's PromQL evaluated on a real Prometheus server scraping Ray's metrics endpoint of a
served run (deploy/local.yaml on a local Ray cluster, a few short turns with every input kind, and three rejected
calls: a bad speaker, a prompt the Thinker refuses, a session whose Redis is down), so that a renamed metric or label
breaks this test instead of a dashboard."""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import pkgutil
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import promql_parser
import pytest

from services import metrics
from services.client import ConverseError, OmniClient
from services.serving import serve_cmd
from services.wire.gen.omni.v1 import common_pb2, thinker_pb2, thinker_pb2_grpc
from services.wire.tensors import to_pieces
from tests.cluster import deployed, free_port, replica_addresses, stage_channel

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_ANNOTATIONS = {"type": "grafana", "uid": "-- Grafana --"}  # the built-in annotations' own data source
# What Grafana substitutes for its own variables. The window covers this module's whole run, so that rate()
# sees every increase since Prometheus started.
GRAFANA_VARIABLES = {"__rate_interval": "5m", "__interval": "5m", "__range": "5m"}
STAGES = {"audio_encoder", "vision_encoder", "thinker", "hooks", "talker", "mtp", "code2wav"}
TURN = {"text": "What do you hear and see?", "greedy": True, "max_new_tokens": 6, "max_audio_frames": 10}
# $var, ${var}, ${var:format}, [[var]]: the forms Grafana interpolates.
VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$(\w+)|\[\[(\w+)\]\]")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<metric>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*$")


# ---- reading dashboards ----------------------------------------------------------------------------------------


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _panels(dashboard: dict) -> list[dict]:
    """Every panel, rows included, and the panels a collapsed row holds."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _targets(dashboard: dict) -> list[tuple[str, dict]]:
    return [(panel.get("title", ""), target) for panel in _panels(dashboard) if panel.get("type") != "row"
            for target in panel.get("targets", [])]


def _datasource_refs(node):
    """Every `datasource` value anywhere in the dashboard."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _datasource_refs(item)


def _query_variables(dashboard: dict) -> dict[str, dict]:
    return {v["name"]: v for v in dashboard["templating"]["list"] if v.get("type") == "query"}


def _variable_query(variable: dict) -> str:
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else query or ""


def _label_values_query(variable: dict) -> tuple[str | None, str]:
    """(metric selector or None, label) of a `label_values(...)` variable query, the only kind these dashboards
    use; anything else fails here, so that a new kind gets its own handling in this test."""
    m = LABEL_VALUES.match(_variable_query(variable))
    if m is None:
        raise AssertionError(f"variable {variable['name']!r}: only label_values(...) queries are evaluated by this "
                             f"test, got {_variable_query(variable)!r}")
    return m.group("metric"), m.group("label")


def _format(values: list[str], variable: dict) -> str:
    """A template variable's value as Grafana's Prometheus data source interpolates it: a multi-value or "All"
    selection becomes the regex (a|b|...) of its escaped values, for use in a =~ matcher."""
    escaped = [re.escape(v).replace("\\", "\\\\") for v in values]  # a backslash is an escape in PromQL strings
    if variable.get("multi") or variable.get("includeAll"):
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"
    return values[0]


def _render(expr: str, values: dict[str, str]) -> str:
    """`expr` with every Grafana variable substituted; an unknown one fails with its name."""
    def sub(m: re.Match) -> str:
        name, fmt = m.group(1) or m.group(3) or m.group(4), m.group(2)
        if fmt not in (None, "regex"):
            raise AssertionError(f"${{{name}:{fmt}}} in {expr!r}: this test substitutes no :{fmt} format")
        if name in GRAFANA_VARIABLES:
            return GRAFANA_VARIABLES[name]
        if name not in values:
            raise AssertionError(f"${name} in {expr!r} is neither a dashboard variable nor one this test knows")
        return values[name]

    return VARIABLE.sub(sub, expr)


def _metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (`name{...}` or `{__name__="name"}`)."""
    names: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers
                         if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def _placeholder_values(dashboard: dict) -> dict[str, str]:
    """Values that let a dashboard's expressions parse without a Prometheus to resolve its variables."""
    return {name: _format(["a", "b"], v) for name, v in _query_variables(dashboard).items()}


def _defined_metric_names() -> dict[str, str]:
    """Every omni_ metric services/ defines (services/metrics.py and the hooks SDK), as Prometheus names it: a
    histogram as its _bucket, _sum and _count series. Name -> the definition's name."""
    import services.hooks

    modules = [metrics] + [importlib.import_module(f"services.hooks.{m.name}")
                           for m in pkgutil.iter_modules(services.hooks.__path__)]
    kinds = (metrics._Histogram, metrics._Counter, metrics._Gauge)
    out = {}
    for module in modules:
        for m in vars(module).values():
            if isinstance(m, kinds):
                suffixes = ("_bucket", "_sum", "_count") if isinstance(m, metrics._Histogram) else ("",)
                out.update({m.name + s: m.name for s in suffixes})
    return out


# ---- static checks (no cluster) ---------------------------------------------------------------------------------


def test_there_are_dashboards_with_unique_uids_and_titles():
    assert DASHBOARDS, "no dashboards/*.json"
    boards = [_load(p) for p in DASHBOARDS]
    assert len({b["uid"] for b in boards}) == len(boards)
    assert len({b["title"] for b in boards}) == len(boards)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_imports_as_is(path):
    """JSON that Grafana imports unchanged: a ${datasource} variable of type datasource/prometheus used by every
    panel and target, no hard-coded data source uid, no import-time __inputs; unique panel ids; every panel has a
    target with an expression that parses once its variables are substituted."""
    dashboard = _load(path)
    assert "__inputs" not in dashboard, "an exported dashboard's __inputs make Grafana ask for a data source"
    datasource = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert [(v["type"], v["query"]) for v in datasource] == [("datasource", "prometheus")], datasource
    refs = list(_datasource_refs(dashboard))
    assert refs and all(ref in (DATASOURCE, GRAFANA_ANNOTATIONS) for ref in refs), \
        f"data sources other than ${{datasource}}: {[r for r in refs if r not in (DATASOURCE, GRAFANA_ANNOTATIONS)]}"
    for variable in _query_variables(dashboard).values():
        _label_values_query(variable)

    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    values = _placeholder_values(dashboard)
    for panel in panels:
        if panel["type"] == "row":
            continue
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), f"{title}: a target without expr"
        assert len({t["refId"] for t in targets}) == len(targets), title
        for target in targets:
            promql_parser.parse(_render(target["expr"], values))  # raises on a syntax error


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_omni_metric_a_dashboard_names_is_defined_in_services(path):
    """Ray exports services' `omni_x` as `ray_omni_x`: a typo or a renamed metric fails here, without a cluster."""
    dashboard = _load(path)
    defined = _defined_metric_names()
    values = _placeholder_values(dashboard)
    exprs = [(title, _render(t["expr"], values)) for title, t in _targets(dashboard)]
    exprs += [(f"variable {name}", metric) for name, v in _query_variables(dashboard).items()
              if (metric := _label_values_query(v)[0])]
    unknown = {(title, name) for title, expr in exprs for name in _metric_names(expr)
               if name.startswith("ray_omni_") and name.removeprefix("ray_") not in defined}
    assert not unknown, f"metrics not defined in services/ (defined: {sorted(set(defined.values()))}): {unknown}"


def test_metric_names_are_read_from_the_expression_tree():
    expr = ('histogram_quantile(0.5, sum by (le) (rate(ray_omni_rtf_bucket{stage=~"(a|b)"}[5m])))'
            ' / on() max_over_time({__name__="ray_serve_x"}[5m:1m]) or on() vector(0)')
    assert _metric_names(expr) == {"ray_omni_rtf_bucket", "ray_serve_x"}
    assert _render('rate(x{s=~"$stage"}[$__rate_interval]) + ${other}', {"stage": "(a|b)", "other": "1"}) == \
        'rate(x{s=~"(a|b)"}[5m]) + 1'
    with pytest.raises(AssertionError, match="unknown_var"):
        _render("x[$unknown_var]", {})


# ---- a served run scraped by a real Prometheus -------------------------------------------------------------------


def _get(url: str, path: str, **params) -> dict:
    query = urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(f"{url}{path}?{query}", timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # Prometheus answers a bad query with 400 and its error in the body
        return json.loads(e.read())


def _instant(url: str, expr: str) -> dict:
    return _get(url, "/api/v1/query", query=expr)


def _wait_until(url: str, exprs: list[str], timeout_s: float = 60.0) -> None:
    """Until every expression returns a series: Ray reports each process's metrics every second
    (tests/cluster.py), Prometheus scrapes every second."""
    deadline = time.monotonic() + timeout_s
    pending = list(exprs)
    while pending:
        pending = [e for e in pending if not _instant(url, e).get("data", {}).get("result")]
        if pending and time.monotonic() > deadline:
            pytest.fail(f"Prometheus never had a series for {pending}")
        if pending:
            time.sleep(0.5)


@contextmanager
def _prometheus(exe: str, target_port: int, workdir: Path):
    """A Prometheus server of our own on a free loopback port, scraping Ray's endpoint every second."""
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: ray\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen([exe, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.3)
        _wait_until(url, ['up{job="ray"} == 1'])
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


async def _reject_in_the_thinker() -> None:
    """A Think call, on a Thinker replica's own port as a peer makes it (mutual TLS), whose prompt the Thinker's
    engine refuses (a token outside its vocabulary): an error inside the stage, counted by
    omni_stage_errors_total{stage="thinker", code="INVALID_ARGUMENT"}."""
    def requests():
        yield thinker_pb2.ThinkRequest(start=thinker_pb2.ThinkStart(
            sampling=common_pb2.SamplingParams(greedy=True), max_new_tokens=2))
        yield from (thinker_pb2.ThinkRequest(prompt=p) for p in to_pieces("input_ids", np.array([10**7])))
        yield thinker_pb2.ThinkRequest(prompt_end=thinker_pb2.PromptEnd())

    (address, *_) = await asyncio.to_thread(replica_addresses, "thinker")
    async with stage_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in thinker_pb2_grpc.ThinkerStub(channel).Think(requests(), timeout=60):
                pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value
    assert "outside the Thinker vocabulary" in error.value.details()


def _wait_for_scrapes(url: str, n: int) -> None:
    """Until Prometheus has scraped Ray's endpoint `n` more times: a counter first seen in the last scrape has one
    sample, and rate() needs two."""
    def scrapes() -> int:
        result = _instant(url, 'count_over_time(up{job="ray"}[1h])')["data"]["result"]
        return int(result[0]["value"][1]) if result else 0

    target, deadline = scrapes() + n, time.monotonic() + 30
    while scrapes() < target:
        if time.monotonic() > deadline:
            pytest.fail(f"Prometheus did not scrape Ray's endpoint {n} times in 30 s")
        time.sleep(0.5)


def _serve_traffic(address: str, url: str, media: dict) -> None:
    client = OmniClient(address)
    turn = {**TURN, "audios": [media["audio"]], "images": [media["image"]]}  # every stage takes part
    client.converse_sync(**turn)
    # Once the first turn's series are scraped, the second turn's observations are increases that rate() sees.
    # Serve's proxy exports its own series with a lag of its own: its latency histogram must be there too, or all of
    # its observations may first appear at once, and rate() sees no increase (CI saw NaN quantiles).
    _wait_until(url, [f"count(count by (stage) (ray_omni_stage_ttft_seconds_count)) >= {len(STAGES)}",
                      "ray_omni_rtf_count", "ray_omni_hook_overhead_seconds_count",
                      'ray_serve_grpc_request_latency_ms_count{method="/omni.v1.Omni/Converse"}'])
    summary, samples = client.converse_sync(**turn)
    assert summary.thinker_token_ids and samples.size
    with pytest.raises(ConverseError) as bad_speaker:
        client.converse_sync(**TURN, speaker="nobody")
    assert bad_speaker.value.code == grpc.StatusCode.INVALID_ARGUMENT
    asyncio.run(_reject_in_the_thinker())
    with pytest.raises(ConverseError) as redis_down:  # the gateway's Redis does not answer
        client.converse_sync(**TURN, session_id="dashboards")
    assert redis_down.value.code == grpc.StatusCode.UNAVAILABLE
    # Every call above has reached Prometheus.
    _wait_until(url, [
        'sum(ray_serve_num_grpc_requests_total{method="/omni.v1.Omni/Converse"}) >= 4',
        'ray_omni_stage_errors_total{stage="thinker"}',
        "min(sum by (stage) (ray_omni_stage_ttft_seconds_count)) >= 2",
        "sum(ray_omni_rtf_count) >= 2",
        "sum(ray_omni_hook_time_to_first_release_seconds_count) >= 2",
        'ray_omni_session_errors_total{op="load"}',
    ])
    _wait_for_scrapes(url, 3)


@pytest.fixture(scope="module")
def served(tiny_ckpt, media, tmp_path_factory):
    """deploy/local.yaml on a fresh local Ray cluster, its gateway's session store a Redis that is down (a port
    nothing listens on), scraped by a Prometheus server, after the traffic above. Yields Prometheus's URL and the
    application names."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.skip("prometheus is not on PATH (apt-get install prometheus; .ci/run installs it)")
    config = serve_cmd.load_config(ROOT / "deploy" / "local.yaml", model=tiny_ckpt)
    gateway = next(app for app in config.applications if app.name == "omni")
    gateway.args["redis_url"] = f"redis://127.0.0.1:{free_port()}/0"
    with deployed(config) as running, _prometheus(exe, running.metrics_port,
                                                  tmp_path_factory.mktemp("prometheus")) as url:
        _serve_traffic(running.address, url, media)
        yield url, {app.name for app in config.applications}


@pytest.fixture(scope="module")
def exported(served) -> set[str]:
    """The metric names Prometheus scraped from the served run."""
    answer = _get(served[0], "/api/v1/label/__name__/values")
    assert answer["status"] == "success", answer
    return set(answer["data"])


def _resolve(url: str, dashboard: dict) -> dict[str, str]:
    """Each query variable's values as Grafana would fetch them from Prometheus, selected as "All"."""
    values = {}
    for name, variable in _query_variables(dashboard).items():
        metric, label = _label_values_query(variable)
        answer = _get(url, f"/api/v1/label/{label}/values", **({"match[]": metric} if metric else {}))
        assert answer["status"] == "success", (name, answer)
        assert answer["data"], f"variable {name!r}: {_variable_query(variable)} has no values"
        values[name] = _format(answer["data"], variable)
    return values


def test_variables_offer_every_stage_and_application(served):
    """The dashboards' variables, resolved as Grafana does, list every stage and application of the run."""
    url, applications = served
    offered = {}
    for path in DASHBOARDS:
        for variable in _query_variables(_load(path)).values():
            metric, label = _label_values_query(variable)
            offered[label] = set(_get(url, f"/api/v1/label/{label}/values", **{"match[]": metric})["data"])
    assert offered == {"stage": STAGES, "application": applications}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_metric_a_dashboard_names_is_exported_by_the_served_run(served, exported, path):
    """A metric a panel names but the run does not export (renamed, or a Ray version's different name) fails
    here by name, before its panel's query comes back empty."""
    dashboard = _load(path)
    values = _resolve(served[0], dashboard)
    names = {(title, name) for title, t in _targets(dashboard) for name in _metric_names(_render(t["expr"], values))}
    names |= {(f"variable {n}", metric) for n, v in _query_variables(dashboard).items()
              if (metric := _label_values_query(v)[0])}
    missing = sorted((title, name) for title, name in names if name not in exported)
    assert not missing, f"not exported by the served run: {missing}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_query_returns_series(served, path):
    """Each target's PromQL, variables substituted, parses in Prometheus and returns at least one series with a
    number (not only NaN: a quantile over no observations)."""
    url = served[0]
    dashboard = _load(path)
    values = _resolve(url, dashboard)
    failures = []
    for title, target in _targets(dashboard):
        expr = _render(target["expr"], values)
        answer = _instant(url, expr)
        if answer.get("status") != "success":
            failures.append(f"{title} [{target['refId']}]: {answer.get('error')}: {expr}")
            continue
        result = answer["data"]["result"]
        numbers = [float(s["value"][1]) for s in result]
        if not result:
            failures.append(f"{title} [{target['refId']}]: no series: {expr}")
        elif all(math.isnan(n) for n in numbers):
            failures.append(f"{title} [{target['refId']}]: only NaN: {expr}")
    assert not failures, "\n".join(failures)


def test_error_panels_show_the_rejected_calls(served):
    """The rejected calls appear in the error panels with their stage, application and gRPC status names."""
    url = served[0]
    dashboard = next(_load(p) for p in DASHBOARDS if _load(p)["uid"] == "omni-serve-overview")
    values = _resolve(url, dashboard)

    def labels(title: str) -> set[tuple]:
        (target,) = next(p["targets"] for p in _panels(dashboard) if p.get("title") == title)
        result = _instant(url, _render(target["expr"], values))["data"]["result"]
        return {tuple(sorted(s["metric"].items())) for s in result}

    assert (("code", "INVALID_ARGUMENT"), ("stage", "thinker")) in labels("Stage errors by stage and status")
    serve_errors = labels("gRPC errors by application and status")
    assert (("application", "omni"), ("error_code", "INVALID_ARGUMENT")) in serve_errors  # the unknown speaker
    assert (("application", "omni"), ("error_code", "UNAVAILABLE")) in serve_errors  # Redis is down
    assert (("op", "load"),) in labels("Session store errors")
