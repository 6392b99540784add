"""Stages only talk to stages (docs/security.md): a stage port with the cluster credential takes only peers holding
it (mutual TLS), serves no reflection and binds only the address it publishes; a deployed replica refuses to start
without the credential; the public proxy serves the gateway only. In process first (a real grpc.aio server on
loopback), then on a real local Ray cluster running deploy/local.yaml with the credential `omni serve` makes."""

from __future__ import annotations

import asyncio
import gc
import os
import stat

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.bench.hops import EchoMTP
from services.client import OmniClient
from services.remote import RemoteMTP
from services.servicers import serve_stage
from services.servicers.mtp import MTPServicer
from services.serving import serve_cmd
from services.wire import cluster_tls
from services.wire.gen.omni.v1 import (
    common_pb2,
    hooks_pb2,
    hooks_pb2_grpc,
    omni_pb2,
    omni_pb2_grpc,
    thinker_pb2,
    thinker_pb2_grpc,
)
from services.wire.server import GRPC_OPTIONS, SERVICE_NAMES
from tests.cluster import deployed, replica_addresses, stage_channel

HOST = "127.0.0.1"
HEALTH = health_pb2.HealthCheckRequest(service=SERVICE_NAMES["MTP"])


# ---- the credential ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def credential(tmp_path_factory) -> cluster_tls.ClusterCredential:
    return cluster_tls.ClusterCredential.load(cluster_tls.generate(tmp_path_factory.mktemp("tls") / "cluster"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> cluster_tls.ClusterCredential:
    """A credential of another CA: a well-formed certificate for the same name, not the cluster's."""
    return cluster_tls.ClusterCredential.load(cluster_tls.generate(tmp_path_factory.mktemp("tls") / "other"))


def test_generate_writes_a_private_directory_and_key(tmp_path):
    directory = cluster_tls.generate(tmp_path / "creds")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / cluster_tls.KEY_FILE).stat().st_mode) == 0o600
    assert sorted(p.name for p in directory.iterdir()) == ["ca.crt", "tls.crt", "tls.key"]  # no CA key kept


def test_omni_cluster_tls_writes_a_credential_that_loads(tmp_path, capsys):
    from services.cli import main

    assert main(["cluster-tls", str(tmp_path / "out"), "--days", "30"]) == 0
    assert "kubectl create secret generic omni-cluster-tls" in capsys.readouterr().out
    assert cluster_tls.for_replica({cluster_tls.TLS_DIR_ENV: str(tmp_path / "out")}) is not None


def test_a_replica_refuses_to_start_without_the_credential_unless_told_to_run_insecure(tmp_path):
    with pytest.raises(cluster_tls.ClusterTLSError, match="OMNI_CLUSTER_TLS_DIR"):
        cluster_tls.for_replica({})
    assert cluster_tls.for_replica({"OMNI_CLUSTER_TLS": "off"}) is None
    with pytest.raises(cluster_tls.ClusterTLSError, match="cannot read"):
        cluster_tls.for_replica({"OMNI_CLUSTER_TLS_DIR": str(tmp_path / "missing")})
    loaded = cluster_tls.for_replica({"OMNI_CLUSTER_TLS_DIR": str(cluster_tls.generate(tmp_path / "c"))})
    assert loaded is not None and b"PRIVATE KEY" in loaded.key


def test_omni_serve_makes_a_credential_only_when_none_is_configured():
    made = serve_cmd.cluster_credential_env({})
    directory = made[cluster_tls.TLS_DIR_ENV]
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert cluster_tls.for_replica(made) is not None
    assert serve_cmd.cluster_credential_env({cluster_tls.TLS_DIR_ENV: "/etc/omni/cluster-tls"}) == {}
    assert serve_cmd.cluster_credential_env({cluster_tls.TLS_SWITCH_ENV: "off"}) == {}


# Serve awaits a replica's `async __del__`; Python's own finalizer, called on the bare objects here, cannot.
@pytest.mark.filterwarnings("ignore:coroutine '_StageReplica.__del__' was never awaited:RuntimeWarning")
async def test_a_stage_replica_refuses_to_start_without_the_credential(tiny_ckpt, monkeypatch, caplog):
    """The replica code Serve runs (its constructor, in this process): no credential, no server; with
    OMNI_CLUSTER_TLS=off it serves plaintext and says so."""
    from services.serving.apps import HooksArgs, HooksReplica
    from services.serving.routes import ReplicaSet

    monkeypatch.delenv(cluster_tls.TLS_DIR_ENV, raising=False)
    monkeypatch.delenv(cluster_tls.TLS_SWITCH_ENV, raising=False)
    cls = HooksReplica.func_or_class
    refused = cls.__new__(cls)
    with pytest.raises(cluster_tls.ClusterTLSError, match="OMNI_CLUSTER_TLS_DIR"):
        await refused.__init__(HooksArgs(model=str(tiny_ckpt)))
    assert not hasattr(refused, "_server")
    with pytest.raises(cluster_tls.ClusterTLSError):  # a peer's stage channels (the gateway's, the Talker's)
        ReplicaSet("mtp", RemoteMTP)
    monkeypatch.setenv(cluster_tls.TLS_SWITCH_ENV, "off")
    insecure = cls.__new__(cls)
    await insecure.__init__(HooksArgs(model=str(tiny_ckpt)))
    try:
        assert "OMNI_CLUSTER_TLS=off" in caplog.text
        async with grpc.aio.insecure_channel(insecure.grpc_address()) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await insecure._server.stop(None)
        del refused, insecure
        gc.collect()  # their finalizers run here, under the filter above


# ---- a stage port in this process -----------------------------------------------------------------------------


@pytest.fixture
async def secure_stage(credential):
    """An MTP servicer (echo stage) on a loopback port with the cluster credential."""
    server, port = await serve_stage(MTPServicer(EchoMTP()), host=HOST, credential=credential)
    yield f"{HOST}:{port}"
    await server.stop(None)


async def _check(channel: grpc.aio.Channel) -> health_pb2.HealthCheckResponse:
    return await health_pb2_grpc.HealthStub(channel).Check(HEALTH, timeout=10)


async def _refused(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _check(channel)
    return error.value


async def test_a_stage_port_refuses_clients_without_the_cluster_credential(secure_stage, credential, foreign):
    plaintext = await _refused(grpc.aio.insecure_channel(secure_stage))
    assert plaintext.code() == grpc.StatusCode.UNAVAILABLE, plaintext
    # TLS that trusts the cluster's CA but shows no client certificate: the server ends the handshake.
    no_cert = grpc.ssl_channel_credentials(root_certificates=credential.ca)
    anonymous = await _refused(grpc.aio.secure_channel(
        secure_stage, no_cert, options=[("grpc.ssl_target_name_override", cluster_tls.PEER_NAME)]))
    assert anonymous.code() == grpc.StatusCode.UNAVAILABLE, anonymous
    # A certificate of another CA (for the right name) is no better.
    other_ca = grpc.ssl_channel_credentials(root_certificates=credential.ca, private_key=foreign.key,
                                            certificate_chain=foreign.cert)
    stranger = await _refused(grpc.aio.secure_channel(
        secure_stage, other_ca, options=[("grpc.ssl_target_name_override", cluster_tls.PEER_NAME)]))
    assert stranger.code() == grpc.StatusCode.UNAVAILABLE, stranger


async def test_a_peer_refuses_a_stage_without_the_cluster_credential(credential, foreign):
    server, port = await serve_stage(MTPServicer(EchoMTP()), host=HOST, credential=foreign)
    try:
        refused = await _refused(cluster_tls.channel(f"{HOST}:{port}", credential, GRPC_OPTIONS))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE, refused
    finally:
        await server.stop(None)


async def test_a_peer_with_the_credential_is_served(secure_stage, credential):
    async with cluster_tls.channel(secure_stage, credential, GRPC_OPTIONS) as channel:
        assert (await _check(channel)).status == health_pb2.HealthCheckResponse.SERVING
        mtp = RemoteMTP(channel)
        hidden = torch.rand(1, 8)
        result = await mtp.predict(hidden, torch.tensor([3]), True, None)
        await mtp.close()
    assert torch.equal(result.embed_sum, hidden) and result.codes[0, 0] == 3  # the echo stage's answer


async def test_a_stage_port_serves_no_reflection(secure_stage, credential):
    async with cluster_tls.channel(secure_stage, credential, GRPC_OPTIONS) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                     timeout=10):
                pass
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_without_a_credential_a_stage_port_stays_plaintext():
    """In-process use (tests, `serve_stage` called directly) keeps plaintext when no credential is given."""
    server, port = await serve_stage(MTPServicer(EchoMTP()), host=HOST)
    try:
        async with grpc.aio.insecure_channel(f"{HOST}:{port}") as channel:
            assert (await _check(channel)).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


# ---- a deployment ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tiny_ckpt):
    """deploy/local.yaml on a fresh local Ray cluster; `ray_head` gives it a fresh credential as `omni serve`
    does (`serve_cmd.set_cluster_env`), and this process's peer channels (`stage_channel`) the same one."""
    config = serve_cmd.load_config(serve_cmd.DEFAULT_CONFIG, model=tiny_ckpt)
    with deployed(config) as running:
        yield running


async def test_deployed_stage_ports_take_only_peers_with_the_credential(cluster, foreign):
    import ray

    node_ip = ray.util.get_node_ip_address()
    for app in ("audio", "vision", "thinker", "hooks", "talker", "mtp", "code2wav"):
        (address,) = await asyncio.to_thread(replica_addresses, app)
        host, port = address.rsplit(":", 1)
        assert host == node_ip, address
        plaintext = await _refused(grpc.aio.insecure_channel(address))
        assert plaintext.code() == grpc.StatusCode.UNAVAILABLE, (app, plaintext)
        stranger = await _refused(cluster_tls.channel(address, foreign, GRPC_OPTIONS))
        assert stranger.code() == grpc.StatusCode.UNAVAILABLE, (app, stranger)
        async with stage_channel(address) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, app
        if node_ip != HOST:  # bound to the published address only: loopback has no listener on that port
            loopback = await _refused(stage_channel(f"{HOST}:{port}"))
            assert loopback.code() == grpc.StatusCode.UNAVAILABLE, (app, loopback)


async def test_the_proxy_serves_no_stage_method(cluster):
    async def no_requests():
        # The proxy answers on the method alone. A message sent meanwhile could meet the closed call and fail on
        # the client as INTERNAL; a Thinker reached by mistake would wait for it until the deadline.
        await asyncio.Event().wait()
        yield thinker_pb2.ThinkRequest(prompt_end=thinker_pb2.PromptEnd())

    async with grpc.aio.insecure_channel(cluster.address) as proxy:
        with pytest.raises(grpc.aio.AioRpcError) as think:
            async for _ in thinker_pb2_grpc.ThinkerStub(proxy).Think(
                    no_requests(), metadata=(("application", "thinker"),), timeout=30):
                pass
        assert think.value.code() == grpc.StatusCode.UNIMPLEMENTED, think.value
        with pytest.raises(grpc.aio.AioRpcError) as describe:
            await hooks_pb2_grpc.HooksStub(proxy).Describe(hooks_pb2.DescribeRequest(),
                                                           metadata=(("application", "hooks"),), timeout=30)
        assert describe.value.code() == grpc.StatusCode.UNIMPLEMENTED, describe.value
        # Health per application stays (operators' checks through the proxy).
        answer = await health_pb2_grpc.HealthStub(proxy).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAMES["Thinker"]), metadata=(("application", "thinker"),),
            timeout=30)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_spoken_turn_through_the_proxy_crosses_every_stage_over_mutual_tls(cluster):
    config = omni_pb2.ConverseConfig(speaker="ethan", max_new_tokens=4, max_audio_frames=6,
                                     thinker_sampling=common_pb2.SamplingParams(greedy=True))
    requests = [omni_pb2.ConverseRequest(config=config),
                omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="Hello!")),
                omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn())]
    pcm, summary = bytearray(), None
    async with grpc.aio.insecure_channel(cluster.address) as proxy:
        async for msg in omni_pb2_grpc.OmniStub(proxy).Converse(iter(requests), metadata=OmniClient("").metadata,
                                                                timeout=120):
            if msg.WhichOneof("kind") == "audio":
                pcm += msg.audio.pcm16
            elif msg.WhichOneof("kind") == "summary":
                summary = msg.summary
    # Text from the Thinker, audio from the Talker (MTP every frame) and Code2Wav: every stage hop took mTLS.
    assert summary is not None and len(summary.thinker_token_ids) > 0
    assert len(pcm) > 0
