"""Inter-stage routes: how the gateway reaches the stages and a Talker replica reaches MTP.

The route (DESIGN.md section 3). Through Serve's gRPC proxy every inbound message of a stream is one actor call
(1.9 ms measured, against 0.13 ms for grpc.aio on loopback), too slow for the per-frame loops: Talker -> MTP every
frame, gateway -> Code2Wav frames, gateway <-> Talker tokens and frames. So every stage replica also serves its
servicer on its own port (`services.servicers.serve_stage`) and peers stream to it directly, paying plain gRPC per
message and nothing else:

    peer ── ReplicaSet.client(): the replica with the fewest calls in flight ── grpc.aio stream ──> replica
      └─ from the first call on, every REFRESH_S: handle.broadcast("grpc_address") ── Serve's live replicas

- The replicas are Serve's: `DeploymentHandle.broadcast` reaches every running replica of the stage's application,
  and each answers with its address. From the first call on, the list is refreshed in the background every
  REFRESH_S, so a turn after an idle spell does not wait for Serve's controller (one broadcast per stage, tens of
  ms each, measured as 2x on time to first audio); it is never used when older than MAX_AGE_S; a replica that Serve stops keeps serving for DRAIN_S first (`apps.py`), so no peer
  picks a replica that is gone. New replicas (autoscaling) get calls within REFRESH_S.
- One replica per call: the fewest calls in flight from this process, round robin among ties, so two replicas
  share even sequential calls. A call is one stream (one turn's Thinker, Talker or Code2Wav work); MTP is called
  per frame, each frame going to the least busy MTP replica over one stream per replica (`RemoteMTP`).
- A replica that dies (UNAVAILABLE: killed, its node gone) is not picked again for FAILED_S, and its calls go on
  on another live replica: the turn sees a hiccup and the same result, not an error. A call that holds no state
  across messages (an encoder's call, one MTP frame: seeded per frame) simply runs again (`ReplicaSet.call`); a
  stream that holds a turn's state (Thinker, Talker, Code2Wav) runs again from its start, its inputs replayed and
  the outputs the caller has had dropped (`ReplicaSet.stream`, `services.serving.resume`); a hook stream is sent
  the turn's calls again (`_ResumedHookTurn`). With no replica left, the call fails UNAVAILABLE at once.
- Serve still sees the load: each replica counts the stage calls it runs and reports them with
  `record_autoscaling_stats`, which `services.serving.autoscaling.stage_load_policy` adds to Serve's own count.
Rejected (docs/serving.md has the measurements and Serve's source): Serve routing each stage call (a lease method
called with `handle.remote`, or `choose_replica`) would count the load natively but costs a handle call per stage
call, ~10 ms measured on 2 busy cores, several times before the first audio packet, and a lease whose caller dies is
never released; Serve's direct ingress is a cluster-wide flag that also removes the proxies off the head node.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from typing import Generic, TypeVar

import grpc
from ray import serve
from torch import Tensor

from services.checkpoint.variant import INSTRUCT, Variant
from services.engines.kv_pages import KEEP_SESSION
from services.engines.mtp import MTPResult
from services.engines.prefix import AudioWindow
from services.engines.sampling import SamplingParams
from services.engines.talker import TalkerPrompt
from services.engines.thinker import ThinkerPrompt
from services.engines.vision_encoder import VisionEmbeddings
from services.hooks import HookContext, HookTurn, Released
from services.metrics import STAGE_FAILOVERS
from services.remote import (
    STAGE_KEYS,
    RemoteAudioEncoder,
    RemoteCode2Wav,
    RemoteHooks,
    RemoteMTP,
    RemoteTalker,
    RemoteThinker,
    RemoteVisionEncoder,
)
from services.serving.resume import Replay, SeenItems, SeenSamples, past
from services.servicers.status import StageError
from services.stages import Codes, Embed, Stages, ThinkerToken
from services.wire import cluster_tls
from services.wire.server import GRPC_OPTIONS

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # refresh the replica list in the background this often
MAX_AGE_S = 4.0  # wait for a refresh when the list is older than this (the first call, or refreshes failing)
DRAIN_S = MAX_AGE_S + 1.0  # a stopping replica serves this long first: every peer has dropped it by then
FAILED_S = DRAIN_S  # a replica whose call failed UNAVAILABLE is passed over this long (refreshes drop a dead one)
FETCH_TIMEOUT_S = 10.0
STICKY_KEYS = 4096  # turns whose replica of a stage a gateway remembers (a turn's live prefills and its answer)
ADDRESS_METHOD = "grpc_address"  # the replica method answering "host:port" of its own gRPC server

C = TypeVar("C")
R = TypeVar("R")
T = TypeVar("T")


class ReplicaSet(Generic[C]):
    """The replicas of one stage application as seen from this process: one channel and one stage client
    (`client_cls(channel)`) per replica, and a choice of replica per call. Use it from one event loop.

    Channels use the cluster credential (`cluster_tls.for_replica`: mutual TLS, as the replicas serve), so a
    process without one, and without `OMNI_CLUSTER_TLS=off`, cannot make a ReplicaSet."""

    def __init__(self, app: str, client_cls: Callable[[grpc.aio.Channel], C],
                 channel_options: list[tuple[str, int]] = GRPC_OPTIONS):
        self.app = app
        self._credential = cluster_tls.for_replica()
        self._client_cls = client_cls
        self._channel_options = channel_options
        self._handle = None  # the app's DeploymentHandle, fetched on first use: the app may deploy after us
        self._addresses: list[str] = []
        self._fetched = -float("inf")  # time.monotonic() of the current list
        self._error: Exception | None = None  # why the last refresh failed
        self._refresh: asyncio.Task | None = None  # the background refresher
        self._refreshed = asyncio.Event()  # set after each fetch attempt
        self._clients: dict[str, C] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._busy: Counter[str] = Counter()  # calls in flight by address
        self._failed: dict[str, float] = {}  # address -> time.monotonic() of its last UNAVAILABLE
        self._turn = 0
        self._sticky: OrderedDict[str, str] = OrderedDict()  # `sticky` keys -> their replica, least recent first

    async def call(self, fn: Callable[[C], Awaitable[R]]) -> R:
        """`await fn(client)` on the least busy replica, for a call that keeps no state on the replica: when that
        replica is gone (UNAVAILABLE), the call runs again on another live one, until none is left untried."""
        tried: set[str] = set()
        error: StageError | None = None  # the last replica's, raised once every live one has failed
        while True:
            address = await self._choose(tried, error)
            try:
                async with self._held(address) as client:
                    return await fn(client)
            except StageError as e:
                error = self._failover(address, e, tried)

    async def stream(self, open_call: Callable[[C, AsyncIterator | None], AsyncIterator[T]],
                     seen: SeenItems | SeenSamples, inputs: AsyncIterator | None = None,
                     affinity: str = "", sticky: bool = False) -> AsyncIterator[T]:
        """The items of `open_call(client, inputs)`, a stream holding a turn's state, from the least busy replica
        (with an `affinity` key: the replica that key maps to, `_affine`; `sticky`: the one this process gave the key
        last, least busy the first time, for a key only this process uses). When that replica dies (UNAVAILABLE) the
        call runs again on another, from its start: it is given `inputs` again from their first item
        (`services.serving.resume.Replay`), and `seen` drops the items already yielded."""
        replay = Replay(inputs) if inputs is not None else None
        tried: set[str] = set()
        error: StageError | None = None
        try:
            while True:
                address = await self._choose(tried, error, affinity, sticky)
                seen.rewind()
                try:
                    async with self._held(address) as client, \
                            aclosing(open_call(client, None if replay is None else replay.reader())) as items:
                        async for item in items:
                            if (item := seen.new(item)) is not None:
                                yield item
                    return
                except StageError as e:
                    error = self._failover(address, e, tried)
        finally:
            if replay is not None:
                await replay.close()

    async def _choose(self, tried: set[str], error: StageError | None, affinity: str = "",
                      sticky: bool = False) -> str:
        """The least busy live replica not in `tried` and not failed lately (any live one on a first try, when all
        have failed lately), or the one `affinity` maps to among those; `error` once every usable one has been
        tried."""
        live = await self._live()
        untried = [a for a in self._usable(live) if a not in tried]
        if not untried and error is not None:
            raise error
        candidates = untried or live
        if not affinity:
            return self._pick(candidates)
        if not sticky:
            return _affine(candidates, affinity)
        address = self._sticky.pop(affinity, None)
        if address not in candidates:
            address = self._pick(candidates)
        self._sticky[affinity] = address  # the most recent last; the oldest go past STICKY_KEYS
        while len(self._sticky) > STICKY_KEYS:
            self._sticky.popitem(last=False)
        return address

    def _failover(self, address: str, error: StageError, tried: set[str]) -> StageError:
        """After `error` from `address`: re-raise it unless the replica is gone (UNAVAILABLE); else pass the replica
        over for FAILED_S and return the error, for the caller to try another."""
        if error.code != grpc.StatusCode.UNAVAILABLE:
            raise error
        self._failed[address] = time.monotonic()
        tried.add(address)
        STAGE_FAILOVERS.inc(app=self.app)
        log.warning("%s replica %s is unavailable (%s); trying another", self.app, address, error)
        return error

    @asynccontextmanager
    async def _held(self, address: str) -> AsyncIterator[C]:
        """The replica's client, counted busy while held."""
        self._busy[address] += 1
        try:
            yield self._client(address)
        finally:
            self._busy[address] -= 1

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._clients.clear()

    def _usable(self, addresses: list[str]) -> list[str]:
        """The addresses without an UNAVAILABLE in the last FAILED_S."""
        now = time.monotonic()
        return [a for a in addresses if now - self._failed.get(a, -FAILED_S) >= FAILED_S]

    def _pick(self, addresses: list[str]) -> str:
        fewest = min(self._busy[a] for a in addresses)
        ties = [a for a in addresses if self._busy[a] == fewest]
        self._turn += 1
        return ties[self._turn % len(ties)]

    def _client(self, address: str) -> C:
        if address not in self._clients:
            self._channels[address] = cluster_tls.channel(address, self._credential, self._channel_options)
            self._clients[address] = self._client_cls(self._channels[address])
        return self._clients[address]

    async def _live(self) -> list[str]:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._keep_fresh())
        if time.monotonic() - self._fetched > MAX_AGE_S:
            self._refreshed.clear()
            await self._refreshed.wait()
            if time.monotonic() - self._fetched > MAX_AGE_S:  # the refresh failed: the list may name gone replicas
                raise StageError(grpc.StatusCode.UNAVAILABLE,
                                 f"no live replica of stage application {self.app!r}: {self._error}")
        return self._addresses

    async def _keep_fresh(self) -> None:
        while True:
            await self._fetch()
            self._refreshed.set()
            await asyncio.sleep(REFRESH_S)

    async def _fetch(self) -> None:
        """Ask every running replica for its address; on failure keep the old list (it ages out)."""
        try:
            if self._handle is None:
                self._handle = await asyncio.to_thread(serve.get_app_handle, self.app)
            answers = await self._handle.broadcast(ADDRESS_METHOD).results_async(
                timeout_s=FETCH_TIMEOUT_S, return_exceptions=True)
        except Exception as e:  # no controller, no such application, timeout
            self._error = e
            log.warning("replicas of %r: %s", self.app, e)
            return
        addresses = sorted(a for a in answers if isinstance(a, str))
        if not addresses:
            self._error = RuntimeError("no running replica answered")
            return
        if addresses != self._addresses:
            log.info("replicas of %r: %s", self.app, ", ".join(addresses))
        self._addresses, self._fetched = addresses, time.monotonic()
        for gone in [a for a in self._channels if a not in addresses and not self._busy[a]]:
            self._clients.pop(gone)
            await self._channels.pop(gone).close()


def _affine(addresses: list[str], key: str) -> str:
    """The replica a key maps to (rendezvous hashing): the same one while it lives, and when replicas come or go
    only the keys of those replicas move. A Thinker replica keeps a session's KV between its turns, so its turns go
    there; a session whose replica is gone (or that evicted its KV) prefills in full on the next, same output."""
    return max(addresses, key=lambda a: hashlib.blake2b(f"{key}@{a}".encode(), digest_size=8).digest())


class RoutedAudioEncoder:
    def __init__(self, replicas: ReplicaSet[RemoteAudioEncoder]):
        self.replicas = replicas

    async def encode(self, input_features: Tensor, feature_attention_mask: Tensor) -> Tensor:
        return await self.replicas.call(lambda encoder: encoder.encode(input_features, feature_attention_mask))


class RoutedVisionEncoder:
    def __init__(self, replicas: ReplicaSet[RemoteVisionEncoder]):
        self.replicas = replicas

    async def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> VisionEmbeddings:
        return await self.replicas.call(lambda encoder: encoder.encode(pixel_values, grid_thw))


class RoutedThinker:
    def __init__(self, replicas: ReplicaSet[RemoteThinker]):
        self.replicas = replicas

    def generate(self, prompt: ThinkerPrompt, sampling: SamplingParams, max_new_tokens: int,
                 stop_ids: frozenset[int], embed: Embed | None = None) -> AsyncIterator[ThinkerToken]:
        # A session's turns go to the replica that keeps its KV (`affinity`: the same from every gateway replica); a
        # turn without a session, whose live prefills and answer all come from this process, to the least busy
        # replica when it starts and to that one after (`sticky`). Resumed on another replica, the same prompt and
        # seed give the same tokens (mm_hidden comes again with the first, which the caller has had); that replica
        # holds nothing for the turn, so it asks `embed` for every medium.
        return self.replicas.stream(
            lambda thinker, _: thinker.generate(prompt, sampling, max_new_tokens, stop_ids, embed),
            SeenItems("thinker", key=lambda token: token.token_id), affinity=prompt.cache_key,
            sticky=prompt.keep != KEEP_SESSION)


class RoutedTalker:
    def __init__(self, replicas: ReplicaSet[RemoteTalker]):
        self.replicas = replicas

    def speak(self, prompt: TalkerPrompt, sampling: SamplingParams, max_frames: int,
              text: AsyncIterator[int]) -> AsyncIterator[Codes]:
        # A session's turns go to the replica that keeps its user parts' KV (`affinity`), a turn's live prefills and
        # answer to the one its first call chose (`sticky`), as the Thinker's. A resumed Talker is sent the released
        # text again from its first token.
        return self.replicas.stream(lambda talker, text: talker.speak(prompt, sampling, max_frames, text),
                                    SeenItems("talker", key=lambda codes: codes), inputs=text,
                                    affinity=prompt.cache_key, sticky=prompt.keep != KEEP_SESSION)


class RoutedMTP:
    """Per frame: MTP keeps no state across frames, and frames are seeded per frame (`services.stages.mtp_seed`),
    so any replica may answer any frame with the same codes, and a frame whose replica died is asked again."""

    def __init__(self, replicas: ReplicaSet[RemoteMTP]):
        self.replicas = replicas

    async def predict(self, hidden: Tensor, c0: Tensor, greedy: bool, seed: int | None) -> MTPResult:
        return await self.replicas.call(lambda mtp: mtp.predict(hidden, c0, greedy, seed))


class RoutedCode2Wav:
    def __init__(self, replicas: ReplicaSet[RemoteCode2Wav]):
        self.replicas = replicas

    def decode(self, frames: AsyncIterator[Codes]) -> AsyncIterator[Tensor]:
        # A resumed Code2Wav is sent every frame again, one per message as before, so that it computes exactly the
        # samples the first one did; the caller gets those past the ones it has.
        return self.replicas.stream(lambda code2wav, frames: code2wav.decode(frames), SeenSamples(), inputs=frames)


class RoutedHooks:
    """A turn holds one replica's Filter stream from the Thinker's first token to the end of the text: filters keep
    per-turn state there. When that replica dies, the turn goes on with a new stream on another (`_ResumedHookTurn`)."""

    def __init__(self, replicas: ReplicaSet[RemoteHooks]):
        self.replicas = replicas

    async def tool_schemas(self) -> list[dict] | None:
        return await self.replicas.call(lambda hooks: hooks.tool_schemas())

    @asynccontextmanager
    async def open(self, ctx: HookContext) -> AsyncIterator[HookTurn]:
        turn = _ResumedHookTurn(self.replicas, ctx)
        try:
            await turn.ask(None)
            yield turn
        finally:
            await turn.close()


class _ResumedHookTurn:
    """One turn's hook stream, kept across a replica's death: every call is logged, and a new stream on another
    replica is sent the turn's calls again (its filters rebuild their state from the same tokens); what it releases
    beyond what the turn has released answers the call that failed. A tool the Thinker called before runs again
    there: tools should be safe to repeat (docs/serving.md)."""

    def __init__(self, replicas: ReplicaSet[RemoteHooks], ctx: HookContext):
        self._replicas, self._ctx = replicas, ctx
        self._calls: list[tuple[str, int | bool]] = []
        self._given = Released()  # everything released to the turn so far
        self._stack: AsyncExitStack | None = None  # the current replica's stream (held, open)
        self._turn: HookTurn | None = None
        self._address = ""  # the current stream's replica
        self._tried: set[str] = set()
        self._error: StageError | None = None

    async def feed(self, token_id: int) -> Released:
        return await self.ask(("feed", token_id))

    async def thinker_end(self, stopped: bool) -> Released:
        return await self.ask(("thinker_end", stopped))

    async def ask(self, call: tuple[str, int | bool] | None) -> Released:
        """Make `call` (None: just open the stream) and answer it, resuming on another replica when needed."""
        if call is not None:
            self._calls.append(call)
        while True:
            fresh = self._turn is None  # a new stream: it is sent every call of the turn
            address = await self._replicas._choose(self._tried, self._error) if fresh else None
            try:
                if fresh:
                    await self._open(address)
                answer = Released()
                for method, arg in self._calls if fresh else self._calls[-1:]:
                    r = await getattr(self._turn, method)(arg)
                    answer.extend(r)
                    answer.resume = r.resume
                answer = past(self._given, answer) if fresh else answer
                self._given.extend(answer)
                return answer
            except StageError as e:
                await self.close()
                self._error = self._replicas._failover(self._address, e, self._tried)

    async def _open(self, address: str) -> None:
        self._address, stack = address, AsyncExitStack()
        try:
            hooks = await stack.enter_async_context(self._replicas._held(address))
            self._turn = await stack.enter_async_context(hooks.open(self._ctx))
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def close(self) -> None:
        stack, self._stack, self._turn = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def routed_stages(apps: Mapping[str, str], processor, speakers: dict[str, int], stop_ids: frozenset[int],
                  sample_rate: int, variant: Variant = INSTRUCT, audio_window: AudioWindow = AudioWindow()) -> Stages:
    """Stages whose calls go to the replicas of Serve applications: `apps` maps "audio", "vision", "thinker", and
    for spoken answers "talker" and "code2wav", to application names. The checkpoint facts come from the caller."""
    unknown, missing = set(apps) - set(STAGE_KEYS), {"audio", "vision", "thinker"} - set(apps)
    if unknown or missing or ("talker" in apps) != ("code2wav" in apps):
        raise ValueError(f"stage applications needed: audio, vision and thinker, and talker with code2wav, of "
                         f"{', '.join(STAGE_KEYS)}; got {sorted(apps)}")
    talker = RoutedTalker(ReplicaSet(apps["talker"], RemoteTalker)) if "talker" in apps else None
    return Stages(
        processor=processor,
        audio=RoutedAudioEncoder(ReplicaSet(apps["audio"], RemoteAudioEncoder)),
        vision=RoutedVisionEncoder(ReplicaSet(apps["vision"], RemoteVisionEncoder)),
        thinker=RoutedThinker(ReplicaSet(apps["thinker"], RemoteThinker)),
        talker=talker,
        code2wav=RoutedCode2Wav(ReplicaSet(apps["code2wav"], RemoteCode2Wav)) if talker else None,
        speakers=speakers if talker else {},
        stop_ids=stop_ids,
        sample_rate=sample_rate,
        variant=variant,
        audio_window=audio_window,
    )


async def close_routed(stages: Stages) -> None:
    """Close the channels of `routed_stages`."""
    for stage in (stages.audio, stages.vision, stages.thinker, stages.talker, stages.code2wav):
        if stage is not None:
            await stage.replicas.close()
