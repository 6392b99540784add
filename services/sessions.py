"""Conversation sessions: the earlier turns of a `session_id`, kept between Converse calls.

A session is an optional system prompt plus the chat messages of its finished turns, in the chat-message format
`services.preprocess.build_turn` takes as history (the format of `omni generate --conversation`). User messages
keep their media: the Thinker's prompt of a later turn holds every earlier turn's audio and images, and the Talker
takes the user parts of every turn, multimodal positions included (DESIGN.md section 1), so a text-only history
would change both. Media are stored as the client sent them (encoded file bytes, or raw PCM16 with its rate), so
a later turn decodes exactly what the first one decoded, and an encoded file stays as small as the client made it.

Two stores:
- `InProcessSessions`: a dict in this process, bounded by a session count (least recently used go first) and a
  TTL. The local default: one gateway replica.
- `RedisSessions`: shared by every gateway replica. Each session is two keys, `<prefix><id>:system` (a string) and
  `<prefix><id>:turns` (a list, one JSON message per element; bytes and arrays as base64). A turn appends its
  user and assistant messages with one RPUSH, so concurrent turns of one session never interleave half a turn.
  Every append resets both keys' TTL: a session expires `ttl_s` after its last turn, media included.
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

    def conversation(self) -> list[dict]:
        """The chat messages `build_turn` takes as history: the system message first, if any."""
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + list(self.messages)


class SessionStore(Protocol):
    async def load(self, session_id: str) -> History:
        """The session's history; an unknown (or expired) id is an empty history."""

    async def append(self, session_id: str, messages: Sequence[dict], system: str | None = None) -> None:
        """Add a finished turn's messages; `system`, if given, becomes the session's system prompt."""

    async def delete(self, session_id: str) -> None: ...

    async def close(self) -> None: ...


def check_session_id(session_id: str) -> None:
    if len(session_id) > MAX_SESSION_ID_CHARS:
        raise InvalidInput(f"session_id is {len(session_id)} characters, the limit is {MAX_SESSION_ID_CHARS}")


class InProcessSessions:
    """Sessions in this process's memory, least recently used evicted beyond `max_sessions`, expired after `ttl_s`
    without a turn. Messages are kept as given (media bytes and arrays are not copied)."""

    def __init__(self, max_sessions: int = 1024, ttl_s: float = DEFAULT_TTL_S):
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self._sessions: OrderedDict[str, tuple[float, History]] = OrderedDict()  # id -> (expiry, history)
        self._lock = asyncio.Lock()

    async def load(self, session_id: str) -> History:
        check_session_id(session_id)
        async with self._lock:
            self._expire()
            if (entry := self._sessions.get(session_id)) is None:
                return History()
            self._sessions.move_to_end(session_id)
            history = entry[1]
            return History(history.system, list(history.messages))

    async def append(self, session_id: str, messages: Sequence[dict], system: str | None = None) -> None:
        check_session_id(session_id)
        async with self._lock:
            self._expire()
            _, history = self._sessions.pop(session_id, (0.0, History()))
            history = History(history.system if system is None else system, [*history.messages, *messages])
            self._sessions[session_id] = (time.monotonic() + self.ttl_s, history)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)

    async def delete(self, session_id: str) -> None:
        async with self._lock:
            self._sessions.pop(session_id, None)

    async def close(self) -> None:
        async with self._lock:
            self._sessions.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, (expiry, _) in self._sessions.items() if expiry <= now]:
            del self._sessions[sid]


class RedisSessions:
    """Sessions in Redis (redis-py's asyncio client), shared by every gateway replica."""

    def __init__(self, url: str, ttl_s: float = DEFAULT_TTL_S, prefix: str = "omni:session:"):
        import redis.asyncio as redis

        self.url = url
        self.ttl_s = ttl_s
        self.prefix = prefix
        self._redis = redis.from_url(url)

    async def load(self, session_id: str) -> History:
        check_session_id(session_id)
        system_key, turns_key = self._keys(session_id)
        async with self._errors("load"):
            async with self._redis.pipeline(transaction=True) as pipe:
                system, turns = await pipe.get(system_key).lrange(turns_key, 0, -1).execute()
        return History(None if system is None else system.decode(), [decode_message(t) for t in turns])

    async def append(self, session_id: str, messages: Sequence[dict], system: str | None = None) -> None:
        check_session_id(session_id)
        system_key, turns_key = self._keys(session_id)
        ttl_ms = int(self.ttl_s * 1000)
        encoded = [encode_message(m) for m in messages]
        async with self._errors("append to"):
            async with self._redis.pipeline(transaction=True) as pipe:
                if system is not None:
                    pipe.set(system_key, system)
                if encoded:
                    pipe.rpush(turns_key, *encoded)
                await pipe.pexpire(system_key, ttl_ms).pexpire(turns_key, ttl_ms).execute()

    async def delete(self, session_id: str) -> None:
        async with self._errors("delete"):
            await self._redis.delete(*self._keys(session_id))

    async def close(self) -> None:
        await self._redis.aclose()

    def _keys(self, session_id: str) -> tuple[str, str]:
        return f"{self.prefix}{session_id}:system", f"{self.prefix}{session_id}:turns"

    @asynccontextmanager
    async def _errors(self, action: str):
        """redis-py's errors -> SessionStoreError: one line for the client, no traceback."""
        import redis

        try:
            yield
        except redis.RedisError as e:
            SESSION_ERRORS.inc(op=action.split()[0])  # load, append, delete
            raise SessionStoreError(f"cannot {action} the session store at {self.url}: {e}") from e


def make_session_store(redis_url: str | None, ttl_s: float = DEFAULT_TTL_S) -> SessionStore:
    """Redis when a URL is configured (the cluster mode), this process's memory otherwise (the local default)."""
    return RedisSessions(redis_url, ttl_s) if redis_url else InProcessSessions(ttl_s=ttl_s)


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
