"""Who is calling: bearer credentials on the client API, verified in the gateway.

A client sends `authorization: Bearer <credential>` in its call metadata. The gateway's `Authenticator` turns it
into a `Principal` (the tenant every turn works for: its sessions, quotas, logs, traces, and the text filters'
context) or refuses the call with UNAUTHENTICATED. Two kinds of credential, each optional:

- **API keys** (`ApiKeys`): random keys (`omni_` + 43 characters) checked against a file of their SHA-256 hashes,
  one `<hex digest> <principal>` line per key (the format of `sha256sum`, so `printf %s "$KEY" | sha256sum` makes
  a line). A fast hash is enough: the keys are 256 random bits, not passwords. The file may be a Kubernetes secret
  mounted into the pod; it is read again when it changes, so rotating a key needs no restart.
- **JWTs** (`JWTVerifier`, PyJWT): signed by a key from a PEM file or a JWKS URL, with the issuer and audience
  checked when configured; the principal is a claim (`sub` by default).

A local `omni serve` creates an API key on first start (`ensure_local_key`): the key in `<config dir>/api-key`
(0600), its hash in `<config dir>/api-keys`, the gateway pointed at that through `OMNI_API_KEYS_FILE`; `omni chat`
and `services.client.OmniClient` read the key from `OMNI_API_KEY` or that file (`local_key`). `OMNI_CONFIG_DIR`
moves the directory (default `~/.config/omni`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.errors import OmniError, Unauthenticated

log = logging.getLogger(__name__)

KEYS_FILE_ENV = "OMNI_API_KEYS_FILE"  # the gateway's default key file (set by `omni serve`)
KEY_ENV = "OMNI_API_KEY"  # a client's key
CONFIG_DIR_ENV = "OMNI_CONFIG_DIR"
KEY_PREFIX = "omni_"
RELOAD_CHECK_S = 2.0  # how often a key file's mtime is looked at
MAX_PRINCIPAL_CHARS = 128
_NO_CREDENTIAL = ("no credentials: send gRPC metadata 'authorization: Bearer <api key or JWT>' (omni serve wrote a "
                  "local key to ~/.config/omni/api-key; OmniClient and omni chat read it, or OMNI_API_KEY)")


@dataclass(frozen=True)
class Principal:
    """The tenant a call works for. `id` scopes its sessions; "" only when authentication is off."""

    id: str
    method: str  # "api_key", "jwt" or "none"


ANONYMOUS = Principal("", "none")


# ---- configuration (the gateway's `auth` arg) ------------------------------------------------------------------


class JWTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jwks_url: str | None = Field(None, description="URL of the issuer's JSON Web Key Set")
    public_key_file: str | None = Field(None, description="instead of jwks_url: a PEM public key file")
    issuer: str | None = Field(None, description="required `iss` claim; unset: not checked")
    audience: str | None = Field(None, description="required `aud` claim; unset: not checked")
    algorithms: list[str] = Field(["RS256", "ES256", "EdDSA"], description="signature algorithms accepted")
    principal_claim: str = Field("sub", description="the claim that names the principal (tenant)")
    leeway_s: float = Field(30.0, ge=0, description="clock skew allowed on exp/nbf")

    @model_validator(mode="after")
    def _one_key_source(self) -> JWTConfig:
        if (self.jwks_url is None) == (self.public_key_file is None):
            raise ValueError("jwt: set exactly one of jwks_url and public_key_file")
        if any(a.upper().startswith("HS") or a.lower() == "none" for a in self.algorithms):
            raise ValueError("jwt: only public-key algorithms (RS*, PS*, ES*, EdDSA) are accepted")
        return self


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: every caller is served, as one anonymous principal")
    api_keys_file: str | None = Field(None, description="hashed API keys, '<sha256 hex> <principal>' per line; "
                                                        f"unset: ${KEYS_FILE_ENV} if set")
    jwt: JWTConfig | None = Field(None, description="accept JWTs signed by this issuer")


def build_authenticator(config: AuthConfig) -> Authenticator | None:
    """The gateway's authenticator; None when authentication is off (logged, loudly)."""
    if not config.enabled:
        log.warning("authentication is OFF: every caller is served, and all share one session namespace")
        return None
    keys_file = config.api_keys_file or os.environ.get(KEYS_FILE_ENV)
    if keys_file is None and config.jwt is None:
        raise OmniError(f"authentication is on but no credential is configured: set the gateway's auth.api_keys_file "
                        f"or auth.jwt (or {KEYS_FILE_ENV}), or auth.enabled: false to serve everyone")
    return Authenticator(ApiKeys(Path(keys_file)) if keys_file else None,
                         JWTVerifier(config.jwt) if config.jwt else None)


# ---- verification -----------------------------------------------------------------------------------------------


class Authenticator:
    """Bearer credential in call metadata -> Principal, or Unauthenticated. A JWT has three dot-separated parts; an
    API key has none."""

    def __init__(self, api_keys: ApiKeys | None = None, jwt_verifier: JWTVerifier | None = None):
        self.api_keys = api_keys
        self.jwt = jwt_verifier

    async def authenticate(self, metadata) -> Principal:
        credential = bearer(metadata)
        is_jwt = credential.count(".") == 2
        if is_jwt and self.jwt is not None:
            return await self.jwt.verify(credential)
        if not is_jwt and self.api_keys is not None:
            return self.api_keys.verify(credential)
        raise Unauthenticated("this kind of credential is not accepted here (the deployment takes "
                              f"{' or '.join(self._kinds())})")

    def _kinds(self) -> list[str]:
        return [kind for kind, v in (("API keys", self.api_keys), ("JWTs", self.jwt)) if v is not None]


def bearer(metadata) -> str:
    """The credential of `authorization: Bearer <credential>` in gRPC metadata (pairs)."""
    values = [v for k, v in metadata or () if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated(_NO_CREDENTIAL)
    scheme, _, credential = str(values[0]).strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        raise Unauthenticated("the authorization metadata must be 'Bearer <api key or JWT>'")
    return credential.strip()


class ApiKeys:
    """Hashed API keys from a file, read again when it changes (a rotated Kubernetes secret)."""

    def __init__(self, path: Path):
        self.path = path
        self._hashes: dict[str, str] = {}
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._load()  # a missing or malformed file fails the gateway's start, not its first call

    def verify(self, key: str) -> Principal:
        self._maybe_reload()
        principal = self._hashes.get(hash_key(key))
        if principal is None:
            raise Unauthenticated("the API key is not valid (revoked, mistyped, or for another deployment)")
        return Principal(principal, "api_key")

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            if _stamp(self.path) != self._stamp:
                self._load()
        except (OSError, OmniError) as e:  # keep serving with the keys already loaded
            log.error("API key file %s: %s; keeping the %d keys loaded before", self.path, e, len(self._hashes))

    def _load(self) -> None:
        try:
            stamp = _stamp(self.path)
            text = self.path.read_text()
        except OSError as e:
            raise OmniError(f"cannot read the API key file {self.path}: {e.strerror}") from e
        self._hashes = parse_keys(text, str(self.path))
        self._stamp = stamp
        log.info("loaded %d API keys from %s", len(self._hashes), self.path)


def parse_keys(text: str, where: str) -> dict[str, str]:
    """`<sha256 hex> <principal>` lines (blank lines and # comments skipped) -> {digest: principal}."""
    hashes = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, principal = line.partition(" ")
        principal = principal.strip().lstrip("*")  # sha256sum's binary-mode marker
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()) or not principal:
            raise OmniError(f"{where} line {n}: expected '<sha256 hex digest> <principal>'")
        if len(principal) > MAX_PRINCIPAL_CHARS:
            raise OmniError(f"{where} line {n}: a principal is at most {MAX_PRINCIPAL_CHARS} characters")
        hashes[digest.lower()] = principal
    return hashes


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _stamp(path: Path) -> tuple[float, int]:
    st = path.stat()
    return st.st_mtime, st.st_size


class JWTVerifier:
    """JWTs checked with PyJWT: signature (PEM key or JWKS), exp/nbf, and issuer/audience when configured."""

    def __init__(self, config: JWTConfig):
        import jwt

        self.config = config
        self._jwt = jwt
        if config.public_key_file:
            try:
                self._key = Path(config.public_key_file).read_text()
            except OSError as e:
                raise OmniError(f"cannot read the JWT public key {config.public_key_file}: {e.strerror}") from e
            self._jwks = None
        else:
            self._key = None
            self._jwks = jwt.PyJWKClient(config.jwks_url, cache_keys=True, lifespan=300)

    async def verify(self, token: str) -> Principal:
        jwt, c = self._jwt, self.config
        try:
            # PyJWKClient fetches the key set over HTTP (then caches it): not on the event loop.
            key = self._key if self._jwks is None else (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt,
                                                                                token)).key
            claims = jwt.decode(token, key, algorithms=c.algorithms, audience=c.audience, issuer=c.issuer,
                                leeway=c.leeway_s, options={"require": ["exp"], "verify_aud": c.audience is not None})
        except jwt.PyJWKClientError as e:
            log.error("JWKS %s: %s", c.jwks_url, e)
            raise Unauthenticated("the JWT's signing key could not be found at the configured issuer") from None
        except jwt.PyJWTError as e:
            raise Unauthenticated(f"the JWT is not valid: {e}") from None
        principal = claims.get(c.principal_claim)
        if not isinstance(principal, str) or not principal or len(principal) > MAX_PRINCIPAL_CHARS:
            raise Unauthenticated(f"the JWT has no usable {c.principal_claim!r} claim (a string of 1 to "
                                  f"{MAX_PRINCIPAL_CHARS} characters)")
        return Principal(principal, "jwt")


# ---- the local key (omni serve, clients on the same machine) ---------------------------------------------------


def add_key(keys_file: Path, principal: str) -> str:
    """A new API key for `principal`, its hash appended to `keys_file` (created 0600 if missing)."""
    if not principal or len(principal) > MAX_PRINCIPAL_CHARS or any(c.isspace() for c in principal):
        raise OmniError(f"a principal is 1 to {MAX_PRINCIPAL_CHARS} characters without spaces")
    if keys_file.exists():
        parse_keys(keys_file.read_text(), str(keys_file))  # append to a valid file only
    key = new_key()
    fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{hash_key(key)} {principal}\n")
    return key


def config_dir() -> Path:
    return Path(os.environ.get(CONFIG_DIR_ENV) or Path.home() / ".config" / "omni")


def ensure_local_key(principal: str = "local") -> tuple[Path, bool]:
    """The key file of a local deployment, with one key for `principal` created if there is none; returns the
    hashed keys file and whether a key was created now."""
    directory = config_dir()
    key_path, keys_path = directory / "api-key", directory / "api-keys"
    if key_path.exists() and keys_path.exists():
        return keys_path, False
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys_path.unlink(missing_ok=True)
    key = add_key(keys_path, principal)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return keys_path, True


def local_key() -> str | None:
    """A client's key: `OMNI_API_KEY`, else the local deployment's key file, else None."""
    if key := os.environ.get(KEY_ENV, "").strip():
        return key
    try:
        return (config_dir() / "api-key").read_text().strip() or None
    except OSError:
        return None
