"""A real local Ray cluster for the test modules that deploy applications on it (one cluster per module)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from services.serving import serve_cmd
from services.wire import cluster_tls
from services.wire.server import GRPC_OPTIONS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def ray_head(metrics_port: int, timeout_s: float = 120.0, env: dict[str, str] | None = None) -> Iterator[None]:
    """A local Ray cluster that `ray start` runs in its own process, and this process connected to it. `env`: more
    environment for the cluster's processes only (e.g. OTEL_* variables).

    Not `ray.init()` starting one: that forks Ray's processes from this test process, whose earlier modules leave
    gRPC threads running, and Ray runs Python in each forked child before exec (its preexec_fn). A child can then
    hang on a lock another thread held at the fork; CI once saw the raylet never register that way."""
    import ray

    serve_cmd.set_cluster_env()  # inherited by `ray start` and every Ray process; a cluster credential included
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000", **(env or {})}  # a RayConfig entry: RAY_<name>
    env.update(serve_cmd.cluster_env(env))
    # Its own temp dir (short: Ray's unix sockets live there), so that the address `ray start` records for a
    # later bare `ray.init()` on this machine goes away with it.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = None
    try:
        deadline = time.monotonic() + timeout_s
        # `ray start` has once exited at once here, silently, and `ray.init` then waited for its GCS for good (CI
        # hung): so the GCS port is waited for first, and a head that exits is started again on another port.
        for attempt in range(3):
            gcs_port = free_port()
            log = os.path.join(temp_dir, f"ray-start-{attempt}.log")
            with open(log, "w") as out:
                head = subprocess.Popen(
                    [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={gcs_port}",
                     "--num-cpus=2", "--include-dashboard=false", f"--metrics-export-port={metrics_port}",
                     "--disable-usage-stats", f"--temp-dir={temp_dir}"], env=env, stdout=out, stderr=subprocess.STDOUT)
            if _listening(head, gcs_port, deadline):
                break
            with open(log) as out:
                print(f"ray start exited with {head.returncode}, trying again:\n{out.read()[-2000:]}", file=sys.stderr)
        else:
            raise RuntimeError("ray start exited three times; its output is above")
        while True:
            try:
                ray.init(address=f"127.0.0.1:{gcs_port}")
                break
            except ConnectionError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield
    finally:
        ray.shutdown()
        if head is not None:
            head.terminate()  # Ray's processes share its fate (the kernel's parent-death signal)
            head.wait(60)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _listening(process: subprocess.Popen, port: int, deadline: float) -> bool:
    """Whether something accepts connections on `port` before `process` exits (False once it has)."""
    while process.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        if time.monotonic() > deadline:
            raise TimeoutError(f"ray start has not opened the GCS port {port}")
        time.sleep(0.5)
    return False


@contextmanager
def deployed(config, timeout_s: float = 300.0, env: dict[str, str] | None = None) -> Iterator[SimpleNamespace]:
    """A Serve config (`serve_cmd.load_config`) running on a fresh local cluster (`env`: more environment for its
    processes), on free ports: yields the gRPC proxy's `address`, the HTTP proxy's `http_port`, Ray's
    Prometheus `metrics_port` and the clients' `api_key` (the local key, as `omni serve` sets it up; None when the
    config turns authentication off). The stages talk mutual TLS with a fresh cluster credential (`ray_head`)."""
    from ray import serve

    from services import auth
    from services.auth import local_key

    os.environ.pop(auth.KEYS_FILE_ENV, None)  # the local key of OMNI_CONFIG_DIR (tests/conftest.py), as omni serve's
    authenticated, _ = serve_cmd.local_auth(config)
    config.grpc_options.port = free_port()
    config.http_options.port = free_port()
    metrics_port = free_port()
    with ray_head(metrics_port, env=env):
        try:
            serve_cmd.start_applications(config)
            serve_cmd.wait_until_running(config, timeout_s=timeout_s)
            yield SimpleNamespace(address=f"127.0.0.1:{config.grpc_options.port}", http_port=config.http_options.port,
                                  metrics_port=metrics_port, api_key=local_key() if authenticated else None)
        finally:
            serve.shutdown()


def replica_addresses(app: str) -> list[str]:
    """The own-port addresses of a running stage application's replicas, as peers get them."""
    from ray import serve

    return serve.get_app_handle(app).broadcast("grpc_address").results(timeout_s=30)


def stage_channel(address: str):
    """A channel to a stage replica's own port as a peer opens it: mutual TLS with the cluster credential that
    `ray_head` gave the cluster (`serve_cmd.set_cluster_env`, as `omni serve` does)."""
    return cluster_tls.channel(address, cluster_tls.from_env(), GRPC_OPTIONS)
