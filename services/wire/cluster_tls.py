"""Mutual TLS between stages: the cluster credential, and the gRPC credentials it gives servers and channels.

Stage replicas are internal (DESIGN.md section 9): a stage's port runs whole turns for whoever reaches it, past the
gateway's authentication and limits, so it accepts only peers that hold the cluster credential. Every peer holds
the same one: a certificate for the name `PEER_NAME`, signed by the cluster's CA, used both to serve and to call.
It lives in a directory named by `OMNI_CLUSTER_TLS_DIR` holding `ca.crt`, `tls.crt` and `tls.key`, the layout of a
Kubernetes TLS secret plus its CA as cert-manager writes it (`k8s/rayservice.yaml` mounts `omni-cluster-tls`
there); `generate` writes a fresh one (`omni serve` does on start, `omni cluster-tls DIR` for a real cluster).

Peers dial replicas by IP (`grpc_address`), so a channel checks the server's certificate against `PEER_NAME`
(`grpc.ssl_target_name_override`), not against the address.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.errors import OmniError

log = logging.getLogger(__name__)

TLS_DIR_ENV = "OMNI_CLUSTER_TLS_DIR"
TLS_SWITCH_ENV = "OMNI_CLUSTER_TLS"  # "off": a deployed replica runs without the credential (insecure, logged)
PEER_NAME = "omni-stage"  # the certificate's DNS SAN, which every channel expects
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"
VALID_DAYS = 365


class ClusterTLSError(OmniError):
    """The cluster credential is missing or unreadable where it is required."""


@dataclass(frozen=True)
class ClusterCredential:
    """The cluster's CA and the peers' certificate and key, PEM."""

    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, directory: str | Path) -> ClusterCredential:
        directory = Path(directory)
        try:
            return cls(*((directory / name).read_bytes() for name in (CA_FILE, CERT_FILE, KEY_FILE)))
        except OSError as e:
            raise ClusterTLSError(f"{TLS_DIR_ENV}={directory}: cannot read the cluster credential ({e}); it needs "
                                  f"{CA_FILE}, {CERT_FILE} and {KEY_FILE} (`omni cluster-tls DIR` writes them)") from e

    def server_credentials(self) -> grpc.ServerCredentials:
        # require_client_auth: a caller without a certificate of the cluster's CA fails the handshake.
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def from_env(env: Mapping[str, str] = os.environ) -> ClusterCredential | None:
    """The credential named by `OMNI_CLUSTER_TLS_DIR`, or None when it is unset."""
    directory = env.get(TLS_DIR_ENV)
    return ClusterCredential.load(directory) if directory else None


def for_replica(env: Mapping[str, str] = os.environ) -> ClusterCredential | None:
    """What a deployed replica (a stage or the gateway) uses: the configured credential; without one it refuses to
    start, unless `OMNI_CLUSTER_TLS=off` says to run insecure."""
    credential = from_env(env)
    if credential is not None:
        return credential
    if env.get(TLS_SWITCH_ENV, "").lower() == "off":
        log.warning("%s=off: stage ports accept and make plaintext connections; anyone who reaches a stage port "
                    "can run turns past the gateway", TLS_SWITCH_ENV)
        return None
    raise ClusterTLSError(f"no cluster credential: set {TLS_DIR_ENV} to a directory with {CA_FILE}, {CERT_FILE} and "
                          f"{KEY_FILE} on every node (`omni serve` makes one; `omni cluster-tls DIR` writes one), or "
                          f"{TLS_SWITCH_ENV}=off to run the stages without TLS")


def add_port(server: grpc.aio.Server, address: str, credential: ClusterCredential | None) -> int:
    """Bind `address` on `server`: mutual TLS with the credential, plaintext without. Returns the bound port."""
    if credential is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credential.server_credentials())


def channel(address: str, credential: ClusterCredential | None,
            options: list[tuple[str, int | str]] = ()) -> grpc.aio.Channel:
    """A channel to a stage at `address`: mutual TLS with the credential (the server must present `PEER_NAME`),
    plaintext without."""
    if credential is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, credential.channel_credentials(),
                                   options=[*options, ("grpc.ssl_target_name_override", PEER_NAME)])


def generate(directory: str | Path, valid_days: int = VALID_DAYS) -> Path:
    """Write a fresh credential into `directory` (made 0700 if new): a CA of its own, and a certificate for
    `PEER_NAME` signed by it for both server and client use. The CA's key is not kept: nothing else can be signed
    with it. Returns the directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    until = now + datetime.timedelta(days=valid_days)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "omni-serve cluster CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, PEER_NAME)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(PEER_NAME)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    _write(directory / KEY_FILE, key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()), 0o600)
    _write(directory / CERT_FILE, cert.public_bytes(pem), 0o644)
    _write(directory / CA_FILE, ca.public_bytes(pem), 0o644)
    return directory


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its mode: the key is never readable by others, not even between open and chmod.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # an existing file keeps its old mode through os.open
