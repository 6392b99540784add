"""`omni serve`: a local Ray cluster running every application of a Serve config, until Ctrl-C.

    omni serve [--model DIR] [--config deploy/local.yaml] [--port P] [--metrics-port M] [--no-auth]

The config is a plain Serve config (`serve deploy` and KubeRay's serveConfigV2 take it as it is); this command
adds what a single machine needs: it starts Ray with `CLUSTER_ENV` (token auth off, the proxy's message limit), a
fresh cluster credential for the stages' mutual TLS unless OMNI_CLUSTER_TLS_DIR names one (`cluster_credential_env`,
docs/security.md) and Prometheus metrics on --metrics-port, points every application's `model` at --model (made
absolute: replicas read it from their own working directory), deploys the applications as `serve run <config>`
does, waits until all are RUNNING and prints the address clients call.

Clients authenticate (`services.auth`): unless the config gives the gateway its own API keys or JWT issuer, the
first start creates a local API key (`~/.config/omni/api-key`, which `omni chat` and `OmniClient` read) and points
the gateway at its hash; `--no-auth` serves everyone, and says so.

The checkpoint decides which stages run (`fit_to_checkpoint`): one without a Talker (the Thinking and Captioner
models) is deployed without the talker, mtp and code2wav applications, and the gateway answers in text only;
`omni serve` says which model it found.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import yaml

from services import tracing
from services.errors import OmniError
from services.wire import cluster_tls
from services.wire.server import MAX_MESSAGE_BYTES

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "local.yaml"
SPEECH_BUILDERS = ("talker_app", "mtp_app", "code2wav_app")  # services.serving.apps builders of the speech stages
POLL_S = 1.0
# The environment a local cluster starts with (its processes inherit it); on a real cluster, set it on the nodes.
CLUSTER_ENV = {
    "RAY_AUTH_MODE": "disabled",  # a new local cluster would otherwise require a token
    # Serve's gRPC proxy accepts 2 GiB messages by default and hands them to the gateway replica whole; with the
    # stages' own limit it refuses an oversized message itself (RESOURCE_EXHAUSTED).
    "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(MAX_MESSAGE_BYTES),
}


def cluster_env(env: dict[str, str]) -> dict[str, str]:
    """What a cluster whose processes start with `env` needs on top of it: `CLUSTER_ENV`, and when the OTEL_*
    variables ask for traces, Serve's own tracing exporting through them (`services.tracing`). Values in `env`
    win."""
    extra = dict(CLUSTER_ENV)
    if tracing.configured(env):
        extra["RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"] = tracing.SERVE_EXPORTER
        # Serve samples 1% by default; a ratio asked for through OTEL_* applies, otherwise every turn.
        extra["RAY_SERVE_TRACING_SAMPLING_RATIO"] = env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")
    return {k: v for k, v in extra.items() if k not in env}


def cluster_credential_env(env: dict[str, str]) -> dict[str, str]:
    """`OMNI_CLUSTER_TLS_DIR` for a cluster whose processes start with `env`, when `env` names no credential (and
    does not turn stage TLS off): a fresh one (`cluster_tls.generate`) in a private temporary directory (0700, the
    key 0600), removed when this process exits. The stages of a local cluster thus always talk mutual TLS."""
    if env.get(cluster_tls.TLS_DIR_ENV) or env.get(cluster_tls.TLS_SWITCH_ENV, "").lower() == "off":
        return {}
    directory = tempfile.mkdtemp(prefix="omni-cluster-tls-")  # mode 0700
    atexit.register(shutil.rmtree, directory, True)
    cluster_tls.generate(directory)
    return {cluster_tls.TLS_DIR_ENV: directory}


def set_cluster_env() -> None:
    """`cluster_env` and `cluster_credential_env` into this process's environment (before `ray.init` starts a
    cluster, whose processes inherit it; this process's own stage clients then use the same credential)."""
    os.environ.update(cluster_env(dict(os.environ)))
    os.environ.update(cluster_credential_env(dict(os.environ)))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory for every application (default: each application's "
                                        "`model` arg in the config)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="Ray Serve config file (default: %(default)s)")
    parser.add_argument("--port", type=int, help="gRPC port clients call (default: the config's grpc_options.port)")
    parser.add_argument("--metrics-port", type=int, help="port of Ray's Prometheus endpoint (default: one Ray picks, "
                                                         "printed)")
    parser.add_argument("--no-auth", action="store_true", help="serve every caller without credentials (the "
                                                               "gateway's auth.enabled: false)")


def load_config(path: str | Path, model: str | Path | None = None, port: int | None = None):
    """The config as a `ray.serve.schema.ServeDeploySchema`, with `model` (when given) in every application that
    takes one, every `model` path absolute, and `port` (when given) as the gRPC port."""
    from ray.serve.schema import ServeDeploySchema

    try:
        raw = yaml.safe_load(Path(path).read_text())
        config = ServeDeploySchema.model_validate(raw)
    except (OSError, yaml.YAMLError, ValueError) as e:
        raise OmniError(f"{path}: not a valid Ray Serve config: {e}") from e
    for app in config.applications:
        if "model" in app.args:
            app.args["model"] = str(Path(model if model is not None else app.args["model"]).resolve())
    if port is not None:
        config.grpc_options.port = port
    return config


def fit_to_checkpoint(config):
    """The variant of the gateway's checkpoint (None without a gateway application); if that checkpoint has no
    Talker, the speech applications are taken out of `config` and the gateway's `stages`. Returns the variant and
    the names of the applications taken out."""
    from services.checkpoint.loading import Checkpoint
    from services.checkpoint.variant import detect_variant
    from services.serving.apps import STAGES

    gateway = next((app for app in config.applications if app.import_path.endswith(":gateway_app")), None)
    if gateway is None or "model" not in gateway.args:
        return None, []
    variant = detect_variant(Checkpoint.open(gateway.args["model"]))
    if variant.speech:
        return variant, []
    speech = [app for app in config.applications if app.import_path.rsplit(":", 1)[-1] in SPEECH_BUILDERS]
    config.applications = [app for app in config.applications if app not in speech]
    stages = gateway.args.get("stages") or {stage: stage for stage in STAGES}
    gateway.args["stages"] = {k: v for k, v in stages.items() if k not in ("talker", "code2wav")}
    return variant, [app.name for app in speech]


def local_auth(config, no_auth: bool = False) -> tuple[bool, str | None]:
    """Client authentication for a cluster on this machine, before it starts: with `no_auth` the gateway's
    `auth.enabled` is set false; a gateway given no credential source of its own gets the local API key
    (`auth.ensure_local_key`, created on first start) through OMNI_API_KEYS_FILE. Returns whether clients must
    authenticate, and what to tell the user."""
    from services.auth import KEYS_FILE_ENV, AuthConfig, ensure_local_key

    gateway = next((app for app in config.applications if app.import_path.endswith(":gateway_app")), None)
    if gateway is None:
        return False, None
    if no_auth:
        gateway.args["auth"] = {**(gateway.args.get("auth") or {}), "enabled": False}
    settings = AuthConfig.model_validate(gateway.args.get("auth") or {})
    if not settings.enabled:
        return False, "authentication is OFF: anyone who can reach the port is served"
    if settings.api_keys_file or settings.jwt or os.environ.get(KEYS_FILE_ENV):
        return True, None
    keys, created = ensure_local_key()
    os.environ[KEYS_FILE_ENV] = str(keys)  # the cluster's processes inherit it
    return True, (f"{'created' if created else 'using'} the local API key in {keys.parent / 'api-key'}: clients on this "
            "machine read it; others send it as gRPC metadata 'authorization: Bearer <key>'")


def start_applications(config) -> None:
    """Start Serve with the config's proxy options and deploy its applications (as `serve run <config>` does)."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(proxy_location=config.proxy_location, http_options=config.http_options.model_dump(),
                grpc_options=config.grpc_options.model_dump())
    _get_global_client().deploy_apps(config)


def wait_until_running(config, timeout_s: float | None = None) -> None:
    """Block until every application of the config is RUNNING; raise if one fails to deploy (or on timeout)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    names = [app.name for app in config.applications]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        failed = [f"{n}: {apps[n].message}" for n in names
                  if n in apps and apps[n].status == ApplicationStatus.DEPLOY_FAILED]
        if failed:
            raise OmniError("deploying failed: " + "; ".join(failed))
        pending = [n for n in names if n not in apps or apps[n].status != ApplicationStatus.RUNNING]
        if not pending:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise OmniError(f"not running after {timeout_s:.0f} s: {', '.join(pending)}")
        time.sleep(POLL_S)


def placement_resources(config) -> dict[str, float]:
    """The custom resources the config's deployments ask for (deploy/gpu.yaml's node classes, which KubeRay's
    worker groups advertise): a one-node cluster has every class, so it advertises them all without limit and
    CPUs and GPUs alone decide what fits."""
    names = {name for app in config.applications for d in app.deployments
             for name in (d.model_dump(exclude_unset=True).get("ray_actor_options") or {}).get("resources", {})}
    return {name: 10_000.0 for name in sorted(names)}


def _check_free(port: int, what: str) -> None:
    """Serve's proxy would fail to bind later, with the error buried in its actor's log."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a port in TIME_WAIT is free
        try:
            s.bind(("", port))
        except OSError as e:
            raise OmniError(f"{what} {port} is not available: {e.strerror}; is another server running?")


def _interrupt(signum, frame) -> NoReturn:
    """SIGTERM (a service manager, `kill`) stops as cleanly as Ctrl-C."""
    raise KeyboardInterrupt


def run_serve(args: argparse.Namespace) -> None:
    import ray
    from ray import serve

    config = load_config(args.config, args.model, args.port)
    for model in sorted({app.args["model"] for app in config.applications if "model" in app.args}):
        if not Path(model).is_dir():
            raise OmniError(f"checkpoint directory {model} does not exist (write a tiny one with "
                            f"`omni checkpoint tiny {model}`, or pass --model DIR)")
    _check_free(config.grpc_options.port, "gRPC port (--port)")
    _check_free(config.http_options.port, f"HTTP port (http_options.port in {args.config})")
    variant, left_out = fit_to_checkpoint(config)
    if variant is not None:
        without = f"; deploying without {', '.join(left_out)}" if left_out else ""
        print(f"omni serve: the checkpoint is {variant.describe()}{without}", flush=True)
    if message := local_auth(config, args.no_auth)[1]:
        print(f"omni serve: {message}", flush=True)
    set_cluster_env()
    # address="local": a new cluster, never one that an earlier `ray start` on this machine left recorded
    context = ray.init(address="local", _metrics_export_port=args.metrics_port, resources=placement_resources(config))
    # After ray.init, which installs a crash handler for SIGTERM that aborts (exit 134) and strands Ray's agents.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        start_applications(config)
        wait_until_running(config)
        print(f"omni serve: ready on 127.0.0.1:{config.grpc_options.port}", flush=True)
        print(f"omni serve: Omni/Converse with gRPC metadata application=omni; Prometheus metrics on "
              f"http://127.0.0.1:{context.address_info['metrics_export_port']}/metrics; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("omni serve: shutting down", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
