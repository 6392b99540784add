"""Client authentication and slots (services.auth, the gateway's admission): API keys from a hashed key file,
JWTs from a PEM key and from a JWKS served over real HTTP, verified by a real gateway over gRPC on loopback; sessions
scoped to their principal; per-principal and per-replica turn limits that refuse at once; the input-idle deadline."""

from __future__ import annotations

import asyncio
import http.server
import json
import subprocess
import threading
import time

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from services import auth
from services.auth import ApiKeys, Authenticator, AuthConfig, JWTConfig, JWTVerifier, Principal
from services.client import ConverseError, OmniClient, call_credentials
from services.engines.bundle import Engines
from services.errors import OmniError, Unauthenticated
from services.gateway import OmniServicer, start_gateway
from services.hooks import FilterChain, Link
from services.hooks.sdk import FilterTurn, Release, TextFilter
from services.remote import RemoteHooks
from services.servicers import serve_stage
from services.servicers.hooks import HooksServicer
from services.serving import serve_cmd
from services.sessions import InProcessSessions
from services.stages import Stages
from services.wire.gen.omni.v1 import omni_pb2, omni_pb2_grpc
from tests.helpers import LoopThread

TURN = dict(text="Hello there.", greedy=True, audio_output=False, max_new_tokens=4)


@pytest.fixture(scope="module")
def signer():
    """An issuer's EC key pair: (private key, public PEM, JWK dict)."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())) | {"kid": "k1", "use": "sig",
                                                                              "alg": "ES256"}
    return key, pem.decode(), jwk


def token(key, kid: str = "k1", **claims) -> str:
    claims = {"sub": "carol", "iss": "https://issuer.test", "aud": "omni", "exp": time.time() + 600} | claims
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, key, algorithm="ES256",
                      headers={"kid": kid})


@pytest.fixture(scope="module")
def jwks_url(signer):
    """A real HTTP server on loopback serving the issuer's JWKS."""
    body = json.dumps({"keys": [signer[2]]}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/jwks.json"
    server.shutdown()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A key file with two principals: {principal: key} and its path."""
    path = tmp_path_factory.mktemp("keys") / "api-keys"
    plain = {"alice": auth.new_key(), "bob": auth.new_key()}
    path.write_text("# tenants\n" + "".join(f"{auth.hash_key(k)} {p}\n" for p, k in plain.items()))
    return plain, path


# ---- verifiers --------------------------------------------------------------------------------------------------


def test_a_key_file_line_is_what_sha256sum_prints(tmp_path):
    key = auth.new_key()
    line = subprocess.run(["sha256sum"], input=key.encode(), capture_output=True, check=True).stdout.decode()
    (tmp_path / "keys").write_text(line.replace(" -", " dave"))
    assert ApiKeys(tmp_path / "keys").verify(key) == Principal("dave", "api_key")
    assert key.startswith("omni_") and len(key) == 48


@pytest.mark.parametrize("text, error", [
    ("abc alice\n", "line 1: expected '<sha256 hex digest> <principal>'"),
    (f"# ok\n{'0' * 64}\n", "line 2"),
    (f"{'g' * 64} alice\n", "line 1"),
])
def test_a_malformed_key_file_fails_loudly(tmp_path, text, error):
    (tmp_path / "keys").write_text(text)
    with pytest.raises(OmniError, match=error):
        ApiKeys(tmp_path / "keys")


def test_a_missing_key_file_is_a_clear_error(tmp_path):
    with pytest.raises(OmniError, match="cannot read the API key file .*missing"):
        ApiKeys(tmp_path / "missing")


def test_a_rotated_key_file_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    old, new = auth.new_key(), auth.new_key()
    path = tmp_path / "keys"
    path.write_text(f"{auth.hash_key(old)} erin\n")
    keys = ApiKeys(path)
    assert keys.verify(old).id == "erin"
    path.write_text(f"{auth.hash_key(new)} erin\n# rotated\n")
    assert keys.verify(new).id == "erin"
    with pytest.raises(Unauthenticated, match="not valid"):
        keys.verify(old)
    path.write_text("not a key file\n")  # a bad edit keeps the keys that worked
    assert keys.verify(new).id == "erin"


async def test_jwts_from_a_pem_key_and_a_jwks_url(signer, jwks_url, tmp_path):
    key, pem, _ = signer
    (tmp_path / "issuer.pem").write_text(pem)
    checks = dict(issuer="https://issuer.test", audience="omni")
    for verifier in (JWTVerifier(JWTConfig(public_key_file=str(tmp_path / "issuer.pem"), **checks)),
                     JWTVerifier(JWTConfig(jwks_url=jwks_url, **checks))):
        assert await verifier.verify(token(key)) == Principal("carol", "jwt")
        bad = {"expired": token(key, exp=time.time() - 3600), "audience": token(key, aud="other"),
               "issuer": token(key, iss="https://evil.test"), "no exp": token(key, exp=None),
               "no sub": token(key, sub=None),
               "signer": token(ec.generate_private_key(ec.SECP256R1())),
               # An HMAC-signed token (what algorithm confusion would forge): refused, whatever its key.
               "hs256": jwt.encode({"sub": "x", "exp": time.time() + 60}, "s" * 40, algorithm="HS256",
                                   headers={"kid": "k1"})}
        for credential in bad.values():
            with pytest.raises(Unauthenticated):
                await verifier.verify(credential)


def test_jwt_config_refuses_symmetric_algorithms_and_ambiguous_key_sources():
    with pytest.raises(ValueError, match="public-key algorithms"):
        JWTConfig(public_key_file="k.pem", algorithms=["HS256"])
    with pytest.raises(ValueError, match="exactly one"):
        JWTConfig(public_key_file="k.pem", jwks_url="http://x")


def test_authentication_on_without_a_credential_source_refuses_to_start(monkeypatch):
    monkeypatch.delenv(auth.KEYS_FILE_ENV, raising=False)
    with pytest.raises(OmniError, match="no credential is configured"):
        auth.build_authenticator(AuthConfig())
    assert auth.build_authenticator(AuthConfig(enabled=False)) is None


def test_omni_serve_creates_one_local_key_and_the_client_reads_it(tmp_path, monkeypatch):
    monkeypatch.setenv(auth.CONFIG_DIR_ENV, str(tmp_path / "omni"))
    # Set (empty) through monkeypatch, so that what local_auth writes there is undone after the test.
    monkeypatch.setenv(auth.KEYS_FILE_ENV, "")
    monkeypatch.delenv(auth.KEY_ENV, raising=False)
    config = serve_cmd.load_config(serve_cmd.DEFAULT_CONFIG)
    authenticated, message = serve_cmd.local_auth(config)
    assert authenticated and message.startswith("created the local API key")
    key = (tmp_path / "omni" / "api-key").read_text().strip()
    assert oct((tmp_path / "omni" / "api-key").stat().st_mode & 0o777) == "0o600"
    assert ApiKeys(tmp_path / "omni" / "api-keys").verify(key).id == "local"
    assert OmniClient("x").api_key == key
    assert auth.os.environ[auth.KEYS_FILE_ENV] == str(tmp_path / "omni" / "api-keys")  # the cluster inherits it
    auth.os.environ[auth.KEYS_FILE_ENV] = ""  # as on a second start
    assert serve_cmd.local_auth(config)[1].startswith("using the local API key")  # a second start keeps it
    assert (tmp_path / "omni" / "api-key").read_text().strip() == key
    monkeypatch.setenv(auth.KEY_ENV, "omni_from_env")
    assert OmniClient("x").api_key == "omni_from_env"
    off, message = serve_cmd.local_auth(config, no_auth=True)
    assert not off and "OFF" in message
    gateway = next(app for app in config.applications if app.name == "omni")
    assert gateway.args["auth"]["enabled"] is False


# ---- the gateway ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stages(tiny_ckpt):
    return Stages.local(Engines.load(tiny_ckpt))


@pytest.fixture(scope="module")
def gateway(stages, keys, jwks_url):
    """A gateway taking API keys and JWTs, with small turn limits and a short input-idle deadline."""
    loop = LoopThread()
    authenticator = Authenticator(ApiKeys(keys[1]), JWTVerifier(JWTConfig(jwks_url=jwks_url, audience="omni")))
    servicer = OmniServicer(stages, InProcessSessions(), authenticator=authenticator, default_deadline_s=60,
                            input_idle_s=2.0, max_turns=4, max_turns_per_principal=2)
    server, port = loop.run(start_gateway(servicer))
    yield f"127.0.0.1:{port}", servicer
    loop.run(server.stop(None))
    loop.stop()


def test_calls_without_valid_credentials_are_unauthenticated(gateway, keys):
    address = gateway[0]
    for api_key, says in (("", "no credentials: send gRPC metadata 'authorization: Bearer"),
                          ("omni_not_a_key", "the API key is not valid"),
                          ("a.b.c", "the JWT is not valid")):
        with pytest.raises(ConverseError) as error:
            OmniClient(address, api_key=api_key).converse_sync(**TURN)
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED and says in error.value.details
        with pytest.raises(ConverseError) as error:
            asyncio.run(OmniClient(address, api_key=api_key).describe())
        assert error.value.code == grpc.StatusCode.UNAUTHENTICATED
    summary, _ = OmniClient(address, api_key=keys[0]["alice"]).converse_sync(**TURN)
    assert len(summary.thinker_token_ids) == 4


def test_the_principal_owns_its_sessions(gateway, keys, signer):
    """bob (an API key) and carol (a JWT) reuse alice's session id: each gets a fresh conversation, the same
    answer as alice's first turn, while alice's second turn sees her history."""
    address, servicer = gateway
    alice, bob = (OmniClient(address, api_key=keys[0][p]) for p in ("alice", "bob"))
    carol = OmniClient(address, api_key=token(signer[0]))
    ask = TURN | {"session_id": "shared", "max_new_tokens": 6}
    first, _ = alice.converse_sync(**ask)
    second, _ = alice.converse_sync(**ask)
    assert second.thinker_token_ids != first.thinker_token_ids  # history changes alice's answer
    for other in (bob, carol):
        theirs, _ = other.converse_sync(**ask)
        assert theirs.thinker_token_ids == first.thinker_token_ids  # nothing of alice's leaked in
    history = {p: asyncio.run(servicer.sessions.load("shared", owner=p)) for p in ("alice", "bob", "carol")}
    assert [len(h.messages) for h in history.values()] == [4, 2, 2]


class _Calls:
    """Raw Converse calls on one channel, closed at the end."""

    def __init__(self, address: str):
        self.channel = grpc.aio.insecure_channel(address)

    async def half_open(self, api_key: str) -> grpc.aio.StreamStreamCall:
        """A call that sends its config and nothing more (a client that never finishes its turn)."""
        call = omni_pb2_grpc.OmniStub(self.channel).Converse(metadata=call_credentials(api_key), timeout=30)
        await call.write(omni_pb2.ConverseRequest(config=omni_pb2.ConverseConfig(max_new_tokens=2)))
        return call


async def _status(call) -> tuple[grpc.StatusCode, str, dict]:
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details(), dict(e.trailing_metadata() or ())
    return grpc.StatusCode.OK, "", {}


async def test_limits_refuse_at_once_and_idle_streams_end(gateway, keys, signer):
    address = gateway[0]
    alice, bob = keys[0]["alice"], keys[0]["bob"]
    calls = _Calls(address)
    held = [await calls.half_open(alice) for _ in range(2)]
    for call in held:
        assert (await call.read()).WhichOneof("kind") == "started"
    t0 = time.perf_counter()
    code, details, trailers = await _status(await calls.half_open(alice))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 turns of yours are open at once" in details
    assert trailers.get("grpc-retry-pushback-ms") == "1000" and time.perf_counter() - t0 < 1.0
    # Another principal is still served while alice's streams are stuck.
    async with OmniClient(address, api_key=bob) as client:
        summary, _ = await client.collect(**TURN)
    assert len(summary.thinker_token_ids) == 4
    more = [await calls.half_open(bob) for _ in range(2)]  # 4 open: the replica's limit
    for call in more:
        assert (await call.read()).WhichOneof("kind") == "started"
    code, details, _ = await _status(await calls.half_open(token(signer[0])))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "its limit of 4 turns at once" in details
    # Silent streams end at the input-idle deadline (2 s), freeing their slots.
    for call in held + more:
        code, details, _ = await _status(call)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no input for 2 s before end_of_turn" in details
    async with OmniClient(address, api_key=alice) as client:
        summary, _ = await client.collect(**TURN)
    assert summary.finish_reason in ("stop", "length")
    await calls.channel.close()


class _Tenants(TextFilter):
    """Records which principal each turn's filter context names."""

    def __init__(self):
        self.seen: list[str] = []

    async def on_text(self, text: str, turn: FilterTurn) -> Release:
        if not self.seen or turn.ctx.request_id != self.seen[-1][0]:
            self.seen.append((turn.ctx.request_id, turn.ctx.principal))
        return Release(text)


def test_the_principal_reaches_the_text_filters_through_the_hook_stage(stages, keys, processor):
    loop = LoopThread()
    recorder = _Tenants()
    hooks_server, hooks_port = loop.run(serve_stage(HooksServicer(FilterChain([Link(recorder, "tenants")]),
                                                                  processor), host="127.0.0.1"))

    async def client():
        return RemoteHooks(grpc.aio.insecure_channel(f"127.0.0.1:{hooks_port}"))

    hooks = loop.run(client())
    servicer = OmniServicer(stages, InProcessSessions(), hooks=hooks, authenticator=Authenticator(ApiKeys(keys[1])))
    server, port = loop.run(start_gateway(servicer))
    try:
        for tenant in ("alice", "bob"):
            OmniClient(f"127.0.0.1:{port}", api_key=keys[0][tenant]).converse_sync(request_id=f"r-{tenant}", **TURN)
        assert recorder.seen == [("r-alice", "alice"), ("r-bob", "bob")]
    finally:
        for coro in (server.stop(None), hooks.channel.close(), hooks_server.stop(None)):
            loop.run(coro)
        loop.stop()


def test_omni_auth_new_key_prints_a_key_that_the_gateway_accepts(tmp_path):
    keys = tmp_path / "keys"
    run = [".venv/bin/omni", "auth", "new-key"]
    first = subprocess.run([*run, "tenant-a", "--keys-file", str(keys)], capture_output=True, text=True, check=True)
    second = subprocess.run([*run, "tenant-b", "--keys-file", str(keys)], capture_output=True, text=True, check=True)
    verifier = ApiKeys(keys)
    assert verifier.verify(first.stdout.strip()).id == "tenant-a" and verifier.verify(second.stdout.strip()).id == \
        "tenant-b"
    assert "shown once" in first.stderr and oct(keys.stat().st_mode & 0o777) == "0o600"
    bad = subprocess.run([*run, "two words", "--keys-file", str(keys)], capture_output=True, text=True)
    assert bad.returncode == 2 and "without spaces" in bad.stderr
