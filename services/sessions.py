"""Conversation sessions: the earlier turns of a `session_id`, kept between Converse calls.

A session is an optional system prompt plus the chat messages of its finished turns, in the chat-message format
`services.preprocess.build_turn` takes as history (the format of `omni generate --conversation`). User messages
keep their parts in the order the user sent them (`services.turn_parts`), media included: the Thinker's prompt of a
later turn holds every earlier turn's audio and images where they stood, and the Talker takes the user parts of
every turn, multimodal positions included (DESIGN.md section 1), so a text-only or regrouped history would change
both. Media are stored as the client sent them (encoded file bytes, or raw PCM16 with its rate), so
a later turn decodes exactly what the first one decoded, and an encoded file stays as small as the client made it.

Two stores:
- `InProcessSessions`: a dict in this process, bounded by a session count and a byte total (least recently used
  go first) and a TTL. The local default: one gateway replica.
- `RedisSessions`: shared by every gateway replica. Each session is two keys, `<prefix><owner>/<id>:system` (a
  string) and `<prefix><owner>/<id>:turns` (a list, one JSON message per element; bytes and arrays as base64;
  `<owner>` is the owner's length, a colon and the owner). A turn appends its
  user and assistant messages with one RPUSH, so concurrent turns of one session never interleave half a turn.
  Every append resets both keys' TTL: a session expires `ttl_s` after its last turn, media included.

Sessions are owned: each is stored under (owner, id), the owner being the authenticated principal
(`services.auth`), so the same id from two tenants names two conversations, and knowing an id gives no access to
another tenant's (a fresh conversation rather than PERMISSION_DENIED, which would confirm that the id exists).
Per-owner `Quotas` (sessions, bytes) evict only that owner's oldest sessions.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from services.errors import InvalidInput, OmniError
from services.metrics import SESSION_ERRORS

DEFAULT_TTL_S = 24 * 3600.0
MAX_SESSION_ID_CHARS = 256


class SessionStoreError(OmniError):
    """The session store cannot be reached or answered with an error (gRPC: UNAVAILABLE)."""


@dataclass
class History:
    """A session's system prompt (None: none given yet) and its messages, oldest first."""

    system: str | None = None
    messages: list[dict] = field(default_factory=list)
    nbytes: int = 0  # the stored size (`stored_bytes`), what the quotas count

    def conversation(self) -> list[dict]:
        """The chat messages `build_turn` takes as history: the system message first, if any."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + list(self.messages)


@dataclass(frozen=True)
class Quotas:
    """What one owner (principal) may keep: its least recently used sessions go first beyond these, so one
    tenant's traffic never evicts another's. `max_session_bytes` is checked by the gateway before a turn runs."""

    max_sessions_per_owner: int = 64
    max_bytes_per_owner: int = 512 << 20
    max_session_bytes: int = 128 << 20  # two 10-minute 48 kHz recordings and their answers


class SessionStore(Protocol):
    quotas: Quotas

    async def load(self, session_id: str, owner: str = "") -> History:
        """The session's history; an unknown (or expired) id is an empty history."""

    async def append(self, session_id: str, messages: Sequence[dict], system: str | None = None,
                     owner: str = "") -> None:
        """Add a finished turn's messages; `system`, if given, becomes the session's system prompt."""

    async def delete(self, session_id: str, owner: str = "") -> None: ...

    async def close(self) -> None: ...


def check_session_id(session_id: str) -> None:
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidInput(f"session_id is {len(session_id)} characters, the limit is {MAX_SESSION_ID_CHARS}")


def stored_bytes(value) -> int:
    """A message's (or a value's) size as stored: media bytes and arrays, text as UTF-8."""
    if isinstance(value, dict):
        return sum(len(k) + stored_bytes(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(stored_bytes(v) for v in value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, str):
        return len(value.encode())
    return 8


def _text_bytes(text: str | None) -> int:
    return len(text.encode()) if text else 0


class InProcessSessions:
    """Sessions in this process's memory: least recently used evicted beyond an owner's `quotas`, and beyond
    `max_sessions` / `max_bytes` in all; expired after `ttl_s` without a turn. Messages are kept as given (media
    bytes and arrays are not copied). Keep `max_sessions` and `max_bytes` above the owners' quotas summed over the
    tenants you serve, or a full store evicts the globally oldest session, whoever owns it."""

    def __init__(self, max_sessions: int = 1024, ttl_s: float = DEFAULT_TTL_S, max_bytes: int = 4 << 30,
                 quotas: Quotas = Quotas()):
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.quotas = quotas
        # (owner, id) -> (expiry, history), least recently used first
        self._sessions: OrderedDict[tuple[str, str], tuple[float, History]] = OrderedDict()
        self._bytes = 0
        self._lock = asyncio.Lock()

    async def load(self, session_id: str, owner: str = "") -> History:
        check_session_id(session_id)
        async with self._lock:
            self._expire()
            if (entry := self._sessions.get((owner, session_id))) is None:
                return History()
            self._sessions.move_to_end((owner, session_id))
            history = entry[1]
            return History(history.system, list(history.messages), history.nbytes)

    async def append(self, session_id: str, messages: Sequence[dict], system: str | None = None,
                     owner: str = "") -> None:
        check_session_id(session_id)
        key = (owner, session_id)
        async with self._lock:
            self._expire()
            old = self._pop(key) or History()
            system = old.system if system is None else system
            nbytes = old.nbytes + stored_bytes(list(messages)) + _text_bytes(system) - _text_bytes(old.system)
            self._sessions[key] = (time.monotonic() + self.ttl_s, History(system, [*old.messages, *messages], nbytes))
            self._bytes += nbytes
            self._evict(key)

    async def delete(self, session_id: str, owner: str = "") -> None:
        async with self._lock:
            self._pop((owner, session_id))

    async def close(self) -> None:
        async with self._lock:
            self._sessions.clear()
            self._bytes = 0

    def _pop(self, key: tuple[str, str]) -> History | None:
        entry = self._sessions.pop(key, None)
        if entry is None:
            return None
        self._bytes -= entry[1].nbytes
        return entry[1]

    def _evict(self, keep: tuple[str, str]) -> None:
        """Oldest first: the owner's sessions beyond its quotas, then anyone's beyond the store's limits."""
        q, owner = self.quotas, keep[0]
        mine = [k for k in self._sessions if k[0] == owner]
        mine_bytes = sum(self._sessions[k][1].nbytes for k in mine)
        for k in mine[:-1]:  # the last is `keep`, the most recent
            if len(mine) <= q.max_sessions_per_owner and mine_bytes <= q.max_bytes_per_owner:
                break
            mine_bytes -= self._pop(k).nbytes
            mine.remove(k)
        while len(self._sessions) > 1 and (len(self._sessions) > self.max_sessions or self._bytes > self.max_bytes):
            self._pop(next(iter(self._sessions)))

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [key for key, (expiry, _) in self._sessions.items() if expiry <= now]:
            self._pop(key)


class RedisSessions:
    """Sessions in Redis (redis-py's asyncio client), shared by every gateway replica. An owner's sessions are
    indexed in a sorted set by last use, with their sizes in a hash, so its quotas evict its own oldest sessions;
    the store's total is bounded by Redis's `maxmemory` (set an eviction policy there)."""

    def __init__(self, url: str, ttl_s: float = DEFAULT_TTL_S, prefix: str = "omni:session:",
                 quotas: Quotas = Quotas()):
        import redis.asyncio as redis

        self.url = url
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.quotas = quotas
        self._redis = redis.from_url(url)

    async def load(self, session_id: str, owner: str = "") -> History:
        check_session_id(session_id)
        system_key, turns_key = self._keys(session_id, owner)
        _, sizes_key = self._owner_keys(owner)
        async with self._errors("load"):
            async with self._redis.pipeline(transaction=True) as pipe:
                system, turns, size = await pipe.get(system_key).lrange(turns_key, 0, -1).hget(
                    sizes_key, session_id).execute()
        if not turns and system is None:
            return History()
        return History(None if system is None else system.decode(), [decode_message(t) for t in turns],
                       int(size or 0))

    async def append(self, session_id: str, messages: Sequence[dict], system: str | None = None,
                     owner: str = "") -> None:
        check_session_id(session_id)
        system_key, turns_key = self._keys(session_id, owner)
        index_key, sizes_key = self._owner_keys(owner)
        ttl_ms = int(self.ttl_s * 1000)
        encoded = [encode_message(m) for m in messages]
        added = stored_bytes(list(messages)) + _text_bytes(system)  # as InProcessSessions counts
        async with self._errors("append to"):
            async with self._redis.pipeline(transaction=True) as pipe:
                if system is not None:
                    pipe.set(system_key, system)
                if encoded:
                    pipe.rpush(turns_key, *encoded)
                pipe.pexpire(system_key, ttl_ms).pexpire(turns_key, ttl_ms)
                pipe.zadd(index_key, {session_id: time.time()}).hincrby(sizes_key, session_id, added)
                await pipe.pexpire(index_key, ttl_ms).pexpire(sizes_key, ttl_ms).execute()
            await self._evict(session_id, owner)

    async def delete(self, session_id: str, owner: str = "") -> None:
        index_key, sizes_key = self._owner_keys(owner)
        async with self._errors("delete"):
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.delete(*self._keys(session_id, owner)).zrem(index_key, session_id).hdel(
                    sizes_key, session_id).execute()

    async def close(self) -> None:
        await self._redis.aclose()

    async def _evict(self, keep: str, owner: str) -> None:
        """The owner's oldest sessions beyond its quotas (expired ones drop out of the index here too)."""
        index_key, sizes_key = self._owner_keys(owner)
        ids = [i.decode() for i in await self._redis.zrange(index_key, 0, -1)]  # oldest first
        sizes = {k.decode(): int(v) for k, v in (await self._redis.hgetall(sizes_key)).items()}
        total, q = sum(sizes.get(i, 0) for i in ids), self.quotas
        for sid in list(ids):
            if sid == keep:
                continue
            alive = await self._redis.exists(self._keys(sid, owner)[1])
            if alive and len(ids) <= q.max_sessions_per_owner and total <= q.max_bytes_per_owner:
                break
            await self.delete(sid, owner)
            ids.remove(sid)
            total -= sizes.get(sid, 0)

    def _keys(self, session_id: str, owner: str) -> tuple[str, str]:
        base = f"{self.prefix}{_owner_tag(owner)}{session_id}"
        return f"{base}:system", f"{base}:turns"

    def _owner_keys(self, owner: str) -> tuple[str, str]:
        return f"{self.prefix}{_owner_tag(owner)}:index", f"{self.prefix}{_owner_tag(owner)}:sizes"

    @asynccontextmanager
    async def _errors(self, action: str):
        """redis-py's errors -> SessionStoreError: one line for the client, no traceback."""
        import redis

        try:
            yield
        except redis.RedisError as e:
            SESSION_ERRORS.inc(op=action.split()[0])  # load, append, delete
            raise SessionStoreError(f"cannot {action} the session store at {self.url}: {e}") from e


def _owner_tag(owner: str) -> str:
    """A key segment for the owner that no (owner, session id) pair shares with another: its length first."""
    return f"{len(owner)}:{owner}/"


def make_session_store(redis_url: str | None, ttl_s: float = DEFAULT_TTL_S, quotas: Quotas = Quotas()) -> SessionStore:
    """Redis when a URL is configured (the cluster mode), this process's memory otherwise (the local default)."""
    return RedisSessions(redis_url, ttl_s, quotas=quotas) if redis_url else InProcessSessions(ttl_s=ttl_s,
                                                                                               quotas=quotas)


# ---- JSON with media -----------------------------------------------------------------------------------------
# Bytes and numpy arrays are tagged objects: {"$bytes": base64} and {"$array": base64, "dtype": "<i2", "shape"}.


def encode_message(message: dict) -> str:
    return json.dumps(_encode(message), separators=(",", ":"))


def decode_message(data: str | bytes) -> dict:
    return json.loads(data, object_hook=_decode)


def _encode(value):
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, np.ndarray):
        a = np.ascontiguousarray(value)
        return {"$array": base64.b64encode(a.tobytes()).decode(), "dtype": a.dtype.str, "shape": list(a.shape)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a session")


def _decode(obj: dict):
    if "$bytes" in obj:
        return base64.b64decode(obj["$bytes"])
    if "$array" in obj:
        return np.frombuffer(base64.b64decode(obj["$array"]), dtype=obj["dtype"]).reshape(obj["shape"])
    return obj
