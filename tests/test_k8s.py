"""The Kubernetes deployment (k8s/), without a cluster: every manifest checked the way a strict API server checks it
(KubeRay's CRD schema for the RayService, Kubernetes' own schemas for the rest), the generated serveConfigV2 against
deploy/gpu.yaml, each deployment's placement on its worker group, ports, probes and network policy against the Serve
config, and the alert rules through promtool, firing on synthetic series."""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml

from services import metrics
from services.auth import AuthConfig
from services.serving import k8s
from services.serving.apps import _STAGE_LABELS
from services.wire import cluster_tls
from services.wire.server import MAX_MESSAGE_BYTES

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERAY_CRDS = ROOT.parent / "shared" / "data" / "kuberay"  # KubeRay v1.7.0-rc.0+5's CRDs (shared/data/README.md)
K8S_VERSION = "1.33"  # the Kubernetes schemas of kubernetes-validate the core resources are checked against
CUSTOM_KINDS = {"RayService", "PodMonitor", "PrometheusRule"}  # not Kubernetes' own: checked otherwise
CLUSTER_TLS_SECRET = "omni-cluster-tls"  # docs/security.md: what to create before applying
DASHBOARD_AGENT_PORT = 52365  # Ray's default dashboard-agent-listen-port, which KubeRay keeps


# ---- loading ------------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """YAML as kubectl reads it with strict field validation: a key given twice is an error, not the last one."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        if dupes := sorted({k for k in keys if keys.count(k) > 1}, key=str):
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dupes}", node.start_mark)
        return super().construct_mapping(node, deep)


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_StrictLoader) if doc is not None]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def all_objects() -> list[dict]:
    return [doc for path in manifest_files() for doc in load_docs(path)]


def find(kind: str, name: str | None = None) -> dict:
    hits = [o for o in all_objects() if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(hits) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(hits)}"
    return hits[0]


def gpu_config() -> dict:
    return yaml.safe_load(k8s.SERVE_CONFIG.read_text())


def cluster() -> dict:
    return find("RayService")["spec"]["rayClusterConfig"]


def ray_groups() -> list[tuple[str, dict]]:
    """(name, group spec) of the head group and every worker group."""
    spec = cluster()
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay: the Ray container comes first


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


# ---- the RayService against KubeRay's CRD ---------------------------------------------------------------------


def strict_schema(schema):
    """An openAPIV3Schema as a strict API server applies it: an object that lists its properties takes no others
    (unless it says x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict_schema(v) for k, v in schema.items()}
    preserved = out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and "additionalProperties" not in out and not preserved:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(crd_path: Path, version: str) -> tuple[dict, jsonschema.Draft202012Validator]:
    crd = yaml.load(crd_path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 18k lines
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return crd, jsonschema.Draft202012Validator(strict_schema(served["schema"]["openAPIV3Schema"]))


def rayservice_errors(obj: dict) -> list[str]:
    crd, validator = crd_validator(KUBERAY_CRDS / "ray.io_rayservices.yaml", "v1")
    assert obj["apiVersion"] == f"{crd['spec']['group']}/v1" and obj["kind"] == crd["spec"]["names"]["kind"]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def test_rayservice_matches_the_kuberay_crd():
    assert KUBERAY_CRDS.is_dir(), f"{KUBERAY_CRDS} is missing: the KubeRay CRDs live in shared/data beside the repo"
    assert rayservice_errors(find("RayService")) == []


@pytest.mark.parametrize("path, value, field", [
    (["spec", "rayClusterConfig", "enableInTreeAutoscalling"], True, "enableInTreeAutoscalling"),
    (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplica"], 1, "minReplica"),
    (["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0, "resource"], {}, "resource"),
    (["spec", "serveService", "spec", "ports", 0, "portt"], 9000, "portt"),
    (["spec", "rayClusterConfig", "workerGroupSpecs", 0, "rayStartParams", "num-gpus"], 1, "is not of type"),
    (["spec", "rayClusterConfig", "authOptions", "mode"], "tokens", "is not one of"),
], ids=["misspelt-cluster-field", "misspelt-group-field", "misspelt-container-field", "misspelt-service-field",
        "number-where-a-string-goes", "unknown-enum-value"])
def test_crd_validation_catches_what_a_strict_api_server_refuses(path, value, field):
    broken = copy.deepcopy(find("RayService"))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = rayservice_errors(broken)
    assert errors and any(field in e for e in errors), errors


# ---- core resources against Kubernetes' schemas ---------------------------------------------------------------


def core_objects() -> list[dict]:
    """Every Kubernetes object of k8s/, plus those KubeRay makes from the RayService's parts: each group's pod
    template (as a PodTemplate) and the Serve Service."""
    objects = [o for o in all_objects() if o["kind"] not in CUSTOM_KINDS]
    for name, group in ray_groups():
        objects.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"omni-{name}"},
                        "template": group["template"]})
    objects.append({"apiVersion": "v1", "kind": "Service", **find("RayService")["spec"]["serveService"]})
    return objects


@pytest.mark.parametrize("obj", core_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_core_resources_are_valid_kubernetes_objects(obj):
    assert kubernetes_validate.validate(obj, K8S_VERSION, strict=True) == K8S_VERSION


def test_core_validation_is_strict():
    service = copy.deepcopy(find("Service", "redis"))
    service["spec"]["ports"][0]["prot"] = 6379
    with pytest.raises(kubernetes_validate.ValidationError, match="prot"):
        kubernetes_validate.validate(service, K8S_VERSION, strict=True)
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate keys"):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=_StrictLoader)


# ---- serveConfigV2 is deploy/gpu.yaml ---------------------------------------------------------------------------


def test_serve_config_v2_is_deploy_gpu_yaml_and_a_serve_config():
    from ray.serve.schema import ServeDeploySchema

    text = k8s.RAYSERVICE.read_text()
    assert k8s.render(text, k8s.SERVE_CONFIG.read_text()) == text, \
        "k8s/rayservice.yaml is stale: run scripts/gen_k8s.sh"
    embedded = find("RayService")["spec"]["serveConfigV2"]
    assert embedded == k8s.SERVE_CONFIG.read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(embedded))
    assert {app.name for app in config.applications} >= {"omni", "thinker", "talker", "mtp", "code2wav"}


def test_render_replaces_the_serve_config_and_nothing_else():
    manifest = "kind: RayService\nspec:\n  rayClusterConfig: {}\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n"
    fresh = k8s.render(manifest, "# header\napplications:\n\n  - name: a\n")
    assert fresh == ("kind: RayService\nspec:\n  rayClusterConfig: {}\n  serveConfigV2: |\n"
                     "    # header\n    applications:\n\n      - name: a\n")
    assert yaml.safe_load(fresh)["spec"]["serveConfigV2"] == "# header\napplications:\n\n  - name: a\n"
    # A block in the middle: what follows it stays.
    middle = k8s.render("spec:\n  serveConfigV2: |\n    x: 1\n  suspend: false\n", "y: 2\n")
    assert yaml.safe_load(middle)["spec"] == {"serveConfigV2": "y: 2\n", "suspend": False}
    with pytest.raises(ValueError, match="one `serveConfigV2: |`"):
        k8s.render("spec: {}\n", "y: 2\n")


# ---- placement: each deployment on its worker group --------------------------------------------------------------


def _quantity(value) -> float:
    """A CPU or GPU quantity ("8", "500m", 1)."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _capacity(group: dict) -> dict[str, float]:
    """What one pod of the group offers Ray: its CPUs, GPUs and the group's custom resources."""
    limits = ray_container(group)["resources"]["limits"]
    out = {"CPU": _quantity(limits["cpu"]), "GPU": _quantity(limits.get("nvidia.com/gpu", 0))}
    return out | {name: float(amount) for name, amount in group.get("resources", {}).items()}


def _demand(deployment: dict) -> tuple[dict[str, float], int, int]:
    """(resources of one replica, min replicas, max replicas) of a Serve config's deployment."""
    opts = deployment["ray_actor_options"]
    one = {"CPU": opts.get("num_cpus", 1), "GPU": opts.get("num_gpus", 0)} | opts.get("resources", {})
    scaling = deployment.get("autoscaling_config")
    low, high = (scaling["min_replicas"], scaling["max_replicas"]) if scaling else (deployment["num_replicas"],) * 2
    return one, low, high


def _placements() -> dict[str, list[tuple[str, dict, int, int]]]:
    """Worker group name -> [(deployment, one replica's resources, min, max)], by each deployment's custom
    resource; asserts every deployment asks for exactly one, offered by exactly one worker group."""
    offered = {}
    for name, group in ray_groups()[1:]:
        for resource in group.get("resources", {}):
            assert resource not in offered, f"{resource} is offered by {offered.get(resource)} and {name}"
            offered[resource] = name
    placed = {name: [] for name in offered.values()}
    for app in gpu_config()["applications"]:
        (deployment,) = app["deployments"]
        one, low, high = _demand(deployment)
        custom = [r for r in one if r not in ("CPU", "GPU")]
        assert len(custom) == 1 and custom[0] in offered, \
            f"{deployment['name']} must ask for one of {sorted(offered)} (ray_actor_options.resources), not {custom}"
        placed[offered[custom[0]]].append((deployment["name"], one, low, high))
    return placed


def test_every_deployment_asks_for_its_groups_resource_in_its_main_resources_amount():
    groups = dict(ray_groups())
    placed = _placements()
    assert {name: sorted(d for d, *_ in ds) for name, ds in placed.items()} == {
        "thinker-gpu": ["Thinker"],
        "stage-gpu": ["AudioEncoder", "Code2Wav", "MTP", "Talker", "VisionEncoder"],
        "cpu": ["Gateway", "Hooks"]}
    for name, deployments in placed.items():
        pod = _capacity(groups[name])
        (custom,) = groups[name]["resources"]
        main = "GPU" if pod["GPU"] else "CPU"  # a pod offers one unit of its class per GPU (CPU nodes: per CPU)
        assert pod[custom] == pod[main], f"{name}: {custom} should equal the pod's {main} count"
        for deployment, one, _, _ in deployments:
            assert one[custom] == one[main], f"{deployment}: {custom} should equal its {main} request"
    assert _capacity(groups["head"])["GPU"] == 0 and groups["head"]["rayStartParams"]["num-cpus"] == "0"
    assert "resources" not in groups["head"]  # nothing is placed on the head


def test_worker_groups_hold_serves_minimum_and_maximum_replicas():
    groups = dict(ray_groups())
    for name, deployments in _placements().items():
        group, pod = groups[name], _capacity(groups[name])
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for deployment, one, _, _ in deployments:
            assert all(one[r] <= pod.get(r, 0) for r in one), f"one {deployment} replica does not fit a {name} pod"
        for pods, index in ((group["minReplicas"], 2), (group["maxReplicas"], 3)):
            for resource, offered in pod.items():
                needed = sum(d[1].get(resource, 0) * d[index] for d in deployments)
                assert needed <= pods * offered + 1e-9, \
                    f"{name}: {pods} pods offer {pods * offered} {resource}, Serve's replicas need {needed}"


# ---- ports, environment, probes, volumes ------------------------------------------------------------------------


def test_every_ray_pod_has_the_environment_ports_probes_and_weights_the_serve_config_needs():
    config = gpu_config()
    grpc_port, http_port = config["grpc_options"]["port"], config["http_options"]["port"]
    model_dirs = {app["args"]["model"] for app in config["applications"]}
    assert cluster()["authOptions"]["mode"] == "token"  # KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN itself
    claims = {o["metadata"]["name"] for o in all_objects() if o["kind"] == "PersistentVolumeClaim"}
    for name, group in ray_groups():
        container = ray_container(group)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] == str(MAX_MESSAGE_BYTES), name
        assert "RAY_AUTH_MODE" not in env, f"{name}: authOptions sets RAY_AUTH_MODE; a value here would win"
        named = ports(container)
        assert named["metrics"] == int(group["rayStartParams"]["metrics-export-port"]), name
        assert named["serve-grpc"] == grpc_port, name
        live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
        assert (live["path"], live["port"]) == ("/api/healthz", DASHBOARD_AGENT_PORT), name
        if name == "head":
            # The head's proxy is not a readiness condition: KubeRay deploys the Serve config once the head is
            # ready, so a head waiting for Serve would wait forever.
            assert (ready["path"], ready["port"]) == ("/api/healthz", DASHBOARD_AGENT_PORT)
        else:
            assert (ready["path"], ready["port"]) == ("/-/healthz", http_port), name
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        for mount in container["volumeMounts"]:
            volume = volumes[mount["name"]]
            assert "secret" in volume or volume["persistentVolumeClaim"]["claimName"] in claims, name
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        assert all(any(Path(d).is_relative_to(m) for m in mounted) for d in model_dirs), f"{name}: weights unmounted"


def test_every_worker_group_mounts_the_cluster_credential_where_the_stages_look():
    """Stage replicas (on the worker groups) refuse to start without the cluster credential
    (`cluster_tls.for_replica`): each worker container names the mounted Secret's directory in OMNI_CLUSTER_TLS_DIR,
    and nothing turns stage TLS off."""
    for name, group in ray_groups():
        container = ray_container(group)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert cluster_tls.TLS_SWITCH_ENV not in env, name
        if name == "head":  # no replicas there (num-cpus 0, no placement resources)
            assert group["rayStartParams"]["num-cpus"] == "0" and "resources" not in group
            continue
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == env[cluster_tls.TLS_DIR_ENV]]
        assert mount.get("readOnly") is True, name
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == CLUSTER_TLS_SECRET, name
        assert "items" not in secret, f"{name}: every key of the secret (ca.crt, tls.crt, tls.key) is needed"
        assert secret.get("defaultMode", 0o644) & 0o002 == 0, f"{name}: the key must not be world-writable"


def test_the_gateway_group_mounts_the_api_keys_where_its_auth_reads_them():
    """Authentication is on in deploy/gpu.yaml: the gateway's key file lies in the Secret omni-api-keys, mounted
    read-only on the worker group that hosts the gateway (the group advertising its placement resource)."""
    (gateway,) = [app for app in gpu_config()["applications"] if app["name"] == "omni"]
    auth_config = AuthConfig.model_validate(gateway["args"]["auth"])
    assert auth_config.enabled and auth_config.api_keys_file
    wanted = set(gateway["deployments"][0]["ray_actor_options"]["resources"])
    (group,) = [g for _, g in ray_groups() if wanted <= set(g.get("resources", {}))]
    container = ray_container(group)
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if Path(auth_config.api_keys_file).parent == Path(m["mountPath"])]
    assert mount.get("readOnly") is True and "subPath" not in mount  # a subPath mount never sees a rotated Secret
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "omni-api-keys" and Path(auth_config.api_keys_file).name == "keys"


def test_the_serve_service_publishes_the_grpc_proxy_only():
    config = gpu_config()
    head = ray_container(cluster()["headGroupSpec"])
    # KubeRay publishes the head container's ports named `serve` or `serve-*` (common/service.go).
    published = {n: p for n, p in ports(head).items() if n == "serve" or n.startswith("serve-")}
    assert published == {"serve-grpc": config["grpc_options"]["port"]}
    service = find("RayService")["spec"]["serveService"]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == list(published.items())


def test_the_gateway_reaches_the_redis_service():
    (gateway,) = [app for app in gpu_config()["applications"] if app["name"] == "omni"]
    url = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", gateway["args"]["redis_url"])
    service, statefulset = find("Service", url[1]), find("StatefulSet", "redis")
    assert [p["port"] for p in service["spec"]["ports"]] == [int(url[2])]
    assert service["spec"]["selector"].items() <= statefulset["spec"]["template"]["metadata"]["labels"].items()


# ---- network policy and scraping ----------------------------------------------------------------------------


def test_network_policy_opens_the_grpc_proxy_and_keeps_the_rest_inside():
    config = gpu_config()
    head_ports = ports(ray_container(cluster()["headGroupSpec"]))
    ray_policy, redis_policy = (find("NetworkPolicy", n)["spec"] for n in ("omni-ray", "omni-redis"))
    for _, group in ray_groups():
        assert selects(ray_policy["podSelector"], group["template"]["metadata"]["labels"])
    assert ray_policy["policyTypes"] == ["Ingress"]
    rules = ray_policy["ingress"]
    # From anywhere: the gRPC proxy, nothing else.
    assert [p["port"] for r in rules if "from" not in r for p in r["ports"]] == [config["grpc_options"]["port"]]
    # Everything (the stage replicas' ephemeral ports included) from the RayService's own pods, and only them.
    internal = [r for r in rules if "from" in r and "ports" not in r]
    assert internal == [{"from": [{"podSelector": ray_policy["podSelector"]}]}]
    # Everyone else by pod labels, on named ports only: the operator (dashboard, HTTP proxy), Prometheus (metrics).
    granted = {}
    for rule in rules:
        if "from" in rule and "ports" in rule:
            assert all(peer["podSelector"]["matchLabels"] and "ipBlock" not in peer for peer in rule["from"])
            for peer in rule["from"]:
                name = peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                granted[name] = {p["port"] for p in rule["ports"]}
    assert granted == {"kuberay-operator": {head_ports["dashboard"], config["http_options"]["port"]},
                       "prometheus": {head_ports["metrics"]}}
    # Redis: the Ray pods, on its port.
    template = find("StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    assert selects(redis_policy["podSelector"], template)
    assert redis_policy["ingress"] == [{"from": [{"podSelector": ray_policy["podSelector"]}],
                                        "ports": [{"protocol": "TCP", "port": 6379}]}]


def test_pod_monitor_scrapes_the_metrics_port_of_every_ray_pod():
    monitor = find("PodMonitor")["spec"]
    for name, group in ray_groups():
        assert selects(monitor["selector"], group["template"]["metadata"]["labels"]), name
        assert "metrics" in ports(ray_container(group)), name
    assert not selects(monitor["selector"], find("StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"])
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["metrics"]


# ---- alerts ---------------------------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:  # fail, not skip: CI installs it
        pytest.fail("promtool is missing: apt-get install prometheus (scripts/test.sh installs it)")
    return path


def rule_groups(annotations: bool = True) -> dict:
    groups = copy.deepcopy(find("PrometheusRule")["spec"]["groups"])
    if not annotations:  # promtool's unit tests compare annotations too; these tests are about expressions
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    return {"groups": groups}


def test_alert_rules_pass_promtool_check(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule_groups()))
    done = subprocess.run([promtool(), "check", "rules", str(rules)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 10 rules found" in done.stdout


def test_alert_rules_name_what_the_code_exports():
    exprs = " ".join(r["expr"] for g in rule_groups()["groups"] for r in g["rules"])
    ours = {m.name for m in vars(metrics).values() if isinstance(m, (metrics._Histogram, metrics._Counter))}
    for name in set(re.findall(r"\bray_omni_\w+", exprs)):
        base = re.sub(r"_(bucket|count|sum)$", "", name.removeprefix("ray_"))
        assert base in ours, f"{name}: services/metrics.py exports no {base}"
    stages = {s for match in re.findall(r'stage[!=]~?"([^"]+)"', exprs) for s in match.split("|")}
    assert stages and stages <= set(_STAGE_LABELS.values()), stages  # the label values services/stages.py sets
    (codes,) = set(re.findall(r'code!~"([^"]+)"', exprs))
    assert set(codes.split("|")) <= {c.name for c in grpc.StatusCode}


# Synthetic series: counters that grow by N per minute (`0+Nx30`). Histograms get a few cumulative buckets.
def _histogram(name: str, labels: str, per_minute: dict[str, int]) -> list[dict]:
    return [{"series": f'{name}_bucket{{{labels}, le="{le}"}}', "values": f"0+{n}x30"} for le, n in per_minute.items()]


ALERT_TESTS = {
    "evaluation_interval": "1m",
    "tests": [{
        "interval": "1m",
        "input_series": [
            # thinker: every request 0.5-1 s, p95 ~0.98 s > 0.5 s. mtp: 40-80 ms, p95 ~78 ms, over MTP's own 50 ms
            # though under everyone else's 0.5 s. talker: 100-250 ms, p95 ~0.24 s: quiet.
            *_histogram("ray_omni_stage_ttft_seconds", 'namespace="omni", stage="thinker"',
                        {"0.1": 0, "0.5": 0, "1.0": 60, "+Inf": 60}),
            *_histogram("ray_omni_stage_ttft_seconds", 'namespace="omni", stage="mtp"',
                        {"0.04": 0, "0.08": 600, "+Inf": 600}),
            *_histogram("ray_omni_stage_ttft_seconds", 'namespace="omni", stage="talker"',
                        {"0.1": 0, "0.25": 60, "+Inf": 60}),
            # first audio: 1-2.5 s in one namespace (p95 ~2.4 s), 0.1-0.5 s in another
            *_histogram("ray_omni_time_to_first_audio_seconds", 'namespace="omni"', {"1.0": 0, "2.5": 60, "+Inf": 60}),
            *_histogram("ray_omni_time_to_first_audio_seconds", 'namespace="fast"', {"0.1": 0, "0.5": 60, "+Inf": 60}),
            # errors: the thinker fails half its requests; the talker's are all the caller's (INVALID_ARGUMENT);
            # code2wav fails every request and so has no TTFT series at all.
            {"series": 'ray_omni_stage_errors_total{namespace="omni", stage="thinker", code="INTERNAL"}',
             "values": "0+60x30"},
            {"series": 'ray_omni_stage_errors_total{namespace="omni", stage="talker", code="INVALID_ARGUMENT"}',
             "values": "0+60x30"},
            {"series": 'ray_omni_stage_errors_total{namespace="omni", stage="code2wav", code="UNAVAILABLE"}',
             "values": "0+6x30"},
            # replicas: Thinker 1 of 2 healthy, Talker 0 of 1, MTP 1 of 1
            {"series": 'ray_serve_deployment_replica_healthy{namespace="omni", ray_io_cluster="omni-x", '
                       'application="thinker", deployment="Thinker", replica="a"}', "values": "1x30"},
            {"series": 'ray_serve_deployment_replica_healthy{namespace="omni", ray_io_cluster="omni-x", '
                       'application="thinker", deployment="Thinker", replica="b"}', "values": "0x30"},
            {"series": 'ray_serve_deployment_replica_healthy{namespace="omni", ray_io_cluster="omni-x", '
                       'application="talker", deployment="Talker", replica="c"}', "values": "0x30"},
            {"series": 'ray_serve_deployment_replica_healthy{namespace="omni", ray_io_cluster="omni-x", '
                       'application="mtp", deployment="MTP", replica="d"}', "values": "1x30"},
            *({"series": f'ray_serve_autoscaling_target_replicas{{namespace="omni", ray_io_cluster="omni-x", '
                         f'application="{app}", deployment="{dep}"}}', "values": f"{n}x30"}
              for app, dep, n in (("thinker", "Thinker", 2), ("talker", "Talker", 1), ("mtp", "MTP", 1))),
        ],
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "OmniStageTTFTHigh", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "namespace": "omni", "stage": "thinker"}},
                {"exp_labels": {"severity": "warning", "namespace": "omni", "stage": "mtp"}}]},
            {"eval_time": "8m", "alertname": "OmniStageTTFTHigh", "exp_alerts": []},  # not before its 10 min
            {"eval_time": "20m", "alertname": "OmniTimeToFirstAudioHigh", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "namespace": "omni"}}]},
            {"eval_time": "20m", "alertname": "OmniStageErrorRatioHigh", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "namespace": "omni", "stage": "thinker"}},
                {"exp_labels": {"severity": "critical", "namespace": "omni", "stage": "code2wav"}}]},
            {"eval_time": "20m", "alertname": "OmniStageDown", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "namespace": "omni", "ray_io_cluster": "omni-x",
                                "application": "talker", "deployment": "Talker"}}]},
            {"eval_time": "20m", "alertname": "OmniStageReplicasBelowTarget", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "namespace": "omni", "ray_io_cluster": "omni-x",
                                "application": app, "deployment": dep}}
                for app, dep in (("thinker", "Thinker"), ("talker", "Talker"))]},
        ],
        "promql_expr_test": [
            {"expr": "namespace_stage:omni_stage_ttft_seconds:p95_5m", "eval_time": "20m", "exp_samples": [
                {"labels": 'namespace_stage:omni_stage_ttft_seconds:p95_5m{namespace="omni", stage="thinker"}',
                 "value": 0.975},
                {"labels": 'namespace_stage:omni_stage_ttft_seconds:p95_5m{namespace="omni", stage="mtp"}',
                 "value": 0.078},
                {"labels": 'namespace_stage:omni_stage_ttft_seconds:p95_5m{namespace="omni", stage="talker"}',
                 "value": 0.2425}]},
        ],
    }],
}


def test_alerts_fire_on_synthetic_series(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(annotations=False)))
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], **ALERT_TESTS}, sort_keys=False))
    done = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_test_fails_when_an_alert_is_wrong(tmp_path):
    """The synthetic-series test can fail: with the Thinker's threshold raised past its p95, that alert is gone."""
    groups = rule_groups(annotations=False)
    for group in groups["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "OmniStageTTFTHigh":
                rule["expr"] = rule["expr"].replace("> 0.5", "> 5")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    tests = tmp_path / "tests.yaml"
    tests.write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], **ALERT_TESTS}, sort_keys=False))
    done = subprocess.run([promtool(), "test", "rules", str(tests)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0 and "OmniStageTTFTHigh" in done.stdout + done.stderr


# ---- kustomize, image --------------------------------------------------------------------------------------


def test_kustomizations_list_every_manifest_once():
    listed = []
    for kustomization in sorted(K8S.rglob("kustomization.yaml")):
        spec = load_docs(kustomization)[0]
        assert spec["kind"] == "Kustomization"
        for resource in spec["resources"]:
            path = (kustomization.parent / resource).resolve()
            assert path.is_file(), f"{kustomization.relative_to(ROOT)} lists a missing {resource}"
            listed.append(path)
    assert sorted(listed) == manifest_files()  # each listed once, none left out
    # The core kustomization needs no CRDs but KubeRay's: monitoring (prometheus-operator's) is its own.
    core = {o["kind"] for p in load_docs(K8S / "kustomization.yaml")[0]["resources"] for o in load_docs(K8S / p)}
    assert not core & {"PodMonitor", "PrometheusRule"}


def test_the_manifests_run_the_image_the_docs_build_from_the_dockerfile():
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    built = {ref for ref in re.findall(r"docker build (?:\S+ )*?-t (\S+) \.", docs) if "$" not in ref}
    images = {ray_container(group)["image"] for _, group in ray_groups()}
    assert len(built) == 1 and images == built, (built, images)
    dockerfile = (ROOT / "Dockerfile").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    ray_version = re.search(r'"ray\[serve\]==([\d.]+)"', pyproject)[1]
    assert re.search(r"^FROM rayproject/ray:(\S+)$", dockerfile, re.M)[1] == f"{ray_version}-py311"
    assert cluster()["rayVersion"] == ray_version
    # torch first, pinned as set-up pins it
    pins = re.compile(r"torch==([\d.]+) torchvision==([\d.]+)")
    assert pins.search(dockerfile).groups() == pins.search((ROOT / "scripts" / "setup.sh").read_text()).groups()
    assert dockerfile.index("torch==") < dockerfile.index("pip install --no-cache-dir /tmp/omni-serve")
