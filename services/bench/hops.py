"""`omni bench hops`: what one message costs on each inter-stage route, next to plain grpc.aio on loopback.

Every route carries a float32 tensor of each size (default 64 B, 4 KiB, 1 MiB) to a server in another process
and back, through the project's real clients and servicers; the stages behind the servicers are echoes, so only
the hop is timed:

- baseline: plain grpc.aio, one bidirectional stream echoing raw bytes (a generic handler, no protobuf);
- MTP stub: `PredictRequest`/`PredictResponse` written and read on one stream, with `to_proto`/`from_proto`;
- Talker -> MTP: `RemoteMTP.predict` (the Talker's per-frame client; the tensor is the hidden state [H]);
- -> Code2Wav: `RemoteCode2Wav.decode`, one codec frame in, a chunk of samples of the size out;
- gateway -> AudioEncoder: `RemoteAudioEncoder.encode`, one call per tensor, crossing as `TensorPiece`s;
- gateway -> Hooks: one Thinker token in, its released text out, on a turn's Filter stream, through the real
  `HooksServicer` and an empty filter chain (the gateway's lockstep: one such round trip per Thinker token). Its
  messages are a token, whatever the size column says.

With `--ray` (a local Ray cluster, ~20 s or more to start) the echo stages also run as Serve replicas, exactly as
the real stage replicas run theirs (`services.serving.apps`), and the per-frame routes are measured the way the
deployment takes them: to a replica's own port through `services.serving.routes` (`RoutedMTP`, `RoutedCode2Wav`),
and, for comparison, MTP through Serve's gRPC proxy (the client -> gateway route).

Per route and size: round trip p50/p90 over `--messages` messages with one in flight, and throughput with
`--window` messages in flight (MB/s counts the tensor once per message). Routes take turns in 3 rounds so that
load from other processes hits all alike; "p50 x" and "tput x" say how many times slower than the baseline a route
is. Goal: per-frame routes (MTP, Code2Wav) within 3x of plain grpc.aio.

With `--tls` every stage route (the baseline too) runs mutual TLS with a fresh cluster credential, as a deployment's
stages do (`services.wire.cluster_tls`); without it, plaintext. Run both to see what TLS costs per message.

    python -m services.bench.hops [--messages 200] [--window 32] [--sizes 64,4KiB,1MiB] [--ray] [--tls]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol

import grpc
import torch
from torch import Tensor

from services.engines.mtp import MTPResult
from services.remote import RemoteAudioEncoder, RemoteCode2Wav, RemoteMTP
from services.wire import cluster_tls
from services.wire.gen.omni.v1 import hooks_pb2_grpc, mtp_pb2_grpc
from services.wire.gen.omni.v1.common_pb2 import Tokens
from services.wire.gen.omni.v1.hooks_pb2 import FilterRequest, FilterStart
from services.wire.gen.omni.v1.mtp_pb2 import MTPFrame, PredictRequest
from services.wire.server import GRPC_OPTIONS, MAX_MESSAGE_BYTES
from services.wire.tensors import from_proto, to_proto

ROUNDS = 3  # routes take turns this many times per size
WARMUP = 5  # messages per opened stream before timing: channel setup, first-call costs
GOAL = 3.0  # per-frame routes' round trip / plain grpc.aio's
ECHO_METHOD = "/hops.Echo/Stream"  # the baseline: raw bytes, no protobuf
NUM_CODES = 16  # codes per codec frame
MTP_APP, CODE2WAV_APP = "hops-mtp", "hops-code2wav"
BASELINE = "grpc.aio bytes echo (baseline)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omni bench hops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200,
                        help="messages per route and size, for the round trips and again for the throughput")
    parser.add_argument("--window", type=int, default=32, help="messages in flight for the throughput")
    parser.add_argument("--sizes", default="64,4KiB,1MiB",
                        help="tensor sizes in bytes, comma-separated, with an optional KiB or MiB suffix")
    parser.add_argument("--ray", action="store_true",
                        help="also measure Serve replicas' own ports and Serve's gRPC proxy (starts a local Ray "
                             "cluster)")
    parser.add_argument("--tls", action="store_true",
                        help="the stage routes with mutual TLS, as deployed (a fresh cluster credential); default: "
                             "plaintext")
    args = parser.parse_args(argv)
    if args.messages < 2 * ROUNDS or args.window < 1:
        parser.error(f"--messages must be at least {2 * ROUNDS} and --window at least 1")
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",")]
    except ValueError as e:
        parser.error(str(e))

    with stage_tls(args.tls), echo_server() as address, \
            echo_replicas() if args.ray else nullcontext() as proxy_address:
        rows = asyncio.run(measure_all(address, proxy_address, sizes, args.messages, args.window))
    security = "mutual TLS" if args.tls else "plaintext"
    print(f"\nOne hop per message, float32 tensors, {args.messages} messages per route and size; throughput with "
          f"{args.window} in flight; server in another process; stage routes (baseline included) {security}, "
          f"Serve's proxy plaintext. p50 x: p50 / the baseline's; tput x: the baseline's msg/s / msg/s (both > 1: "
          f"slower)")
    print_table(rows)


@contextmanager
def stage_tls(on: bool) -> Iterator[None]:
    """While it lasts, the environment that the echo server, the echo replicas and this process's stage channels
    read (`cluster_tls.from_env` / `for_replica`) says: a fresh credential, or stage TLS off. Restored after."""
    names = (cluster_tls.TLS_DIR_ENV, cluster_tls.TLS_SWITCH_ENV)
    saved = {name: os.environ.get(name) for name in names}
    with tempfile.TemporaryDirectory(prefix="omni-hops-tls-") as directory:
        if on:
            values = {cluster_tls.TLS_DIR_ENV: str(cluster_tls.generate(directory)), cluster_tls.TLS_SWITCH_ENV: None}
        else:
            values = {cluster_tls.TLS_DIR_ENV: None, cluster_tls.TLS_SWITCH_ENV: "off"}
        try:
            _set_env(values)
            yield
        finally:
            _set_env(saved)


def _set_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def parse_size(text: str) -> int:
    text = text.strip()
    for suffix, scale in (("KiB", 1 << 10), ("MiB", 1 << 20), ("B", 1)):
        if text.endswith(suffix):
            number, unit = text[: -len(suffix)].strip(), scale
            break
    else:
        number, unit = text, 1
    if not number.isdigit():
        raise ValueError(f"not a size: {text!r}; expected e.g. 64, 4KiB, 1MiB")
    size = int(number) * unit
    if size < 4 or size % 4 or size > MAX_MESSAGE_BYTES // 2:
        raise ValueError(f"size {text!r}: a float32 tensor of 4 B to {MAX_MESSAGE_BYTES // 2 >> 20} MiB is needed "
                         f"(multiples of 4 B; bigger tensors cross as 1 MiB pieces)")
    return size


# ---- the echo stages: each answers with a tensor the size of its input, doing nothing else ----------------------


class EchoMTP:
    """An MTPStage: codes c0 then zeros, and the hidden state back as embed_sum (same size as what came in)."""

    async def predict(self, hidden: Tensor, c0: Tensor, greedy: bool, seed: int | None) -> MTPResult:
        codes = torch.zeros(hidden.shape[0], NUM_CODES, dtype=torch.long)
        codes[:, 0] = c0
        return MTPResult(codes=codes, embed_sum=hidden)


class EchoCode2Wav:
    """A Code2WavStage answering each frame with as many float32 samples as its first code says: the bench sizes the
    response from the request, as the real stage's chunk size follows from the frames."""

    def __init__(self):
        self._chunks: dict[int, Tensor] = {}

    async def decode(self, frames: AsyncIterator[tuple[int, ...]]) -> AsyncIterator[Tensor]:
        async for frame in frames:
            n = frame[0]
            if n not in self._chunks:
                self._chunks[n] = torch.rand(n)
            yield self._chunks[n]


class EchoAudioEncoder:
    """An AudioEncoderStage whose embeddings are its features."""

    async def encode(self, input_features: Tensor, feature_attention_mask: Tensor) -> Tensor:
        return input_features


# ---- the server process of the non-Ray routes -------------------------------------------------------------------


@contextmanager
def echo_server() -> Iterator[str]:
    """The baseline echo and the echo stages' servicers on one grpc.aio server in a child process (its own event
    loop and GIL, as a stage replica has); yields its address."""
    process = subprocess.Popen([sys.executable, "-c", "from services.bench.hops import serve_echo; serve_echo()"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = process.stdout.readline().strip()
        if not port.isdigit():
            raise RuntimeError(f"the echo server process failed (exit code {process.wait()})")
        yield f"127.0.0.1:{port}"
    finally:
        process.stdin.close()  # the child stops at the end of its input
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serve_echo() -> None:
    """The child of `echo_server`: prints its port, serves until its input ends."""
    asyncio.run(_serve_echo())


async def _serve_echo() -> None:
    from types import SimpleNamespace

    from services.checkpoint.tokenizer import build_qwen_tokenizer
    from services.hooks import FilterChain
    from services.servicers.audio_encoder import AudioEncoderServicer
    from services.servicers.code2wav import Code2WavServicer
    from services.servicers.hooks import HooksServicer
    from services.servicers.mtp import MTPServicer

    server = grpc.aio.server(options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((_bytes_echo_handler(),))
    tokenizer = await asyncio.to_thread(build_qwen_tokenizer)  # the real vocabulary: the stage decodes each token
    processor = SimpleNamespace(tokenizer=tokenizer, apply_chat_template=tokenizer.apply_chat_template)
    for servicer in (MTPServicer(EchoMTP()), Code2WavServicer(EchoCode2Wav()),
                     AudioEncoderServicer(EchoAudioEncoder()), HooksServicer(FilterChain([]), processor)):
        servicer.add_to_server(servicer, server)
    port = cluster_tls.add_port(server, "127.0.0.1:0", cluster_tls.from_env())  # as the parent chose (--tls)
    await server.start()
    print(port, flush=True)
    await asyncio.to_thread(sys.stdin.read)
    await server.stop(None)


def _bytes_echo_handler() -> grpc.GenericRpcHandler:
    async def echo(requests, context):  # no serializers: the messages are the bytes themselves
        async for payload in requests:
            yield payload

    service, method = ECHO_METHOD.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {method: grpc.stream_stream_rpc_method_handler(echo)})


# ---- the Ray routes: the echo stages as Serve replicas ----------------------------------------------------------


@contextmanager
def echo_replicas() -> Iterator[str]:
    """A local Ray cluster with the echo MTP and Code2Wav as Serve applications (`MTP_APP`, `CODE2WAV_APP`) built as
    the real stage replicas are; yields the address of Serve's gRPC proxy."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a new local cluster would otherwise require a token
    import ray
    from ray import serve

    from services.serving.apps import _StageReplica, proxied

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # keep Serve's progress lines out of the table

    # Defined here, not at module level: importing ray.serve takes ~10 s, which runs without --ray skip.
    class EchoMTPReplica(_StageReplica):
        async def __init__(self):
            from services.servicers.mtp import MTPServicer

            await self._serve(EchoMTP(), MTPServicer)

        async def Predict(self, requests, grpc_context) -> AsyncIterator:
            async for msg in proxied(self.servicer.Predict, requests, grpc_context):
                yield msg

    class EchoCode2WavReplica(_StageReplica):
        async def __init__(self):
            from services.servicers.code2wav import Code2WavServicer

            await self._serve(EchoCode2Wav(), Code2WavServicer)

    proxy_port = _free_port()
    print("starting a local Ray cluster and the echo replicas ...", flush=True)
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()},
                    grpc_options={"port": proxy_port, "grpc_servicer_functions": [
                        "services.wire.gen.omni.v1.mtp_pb2_grpc.add_MTPServicer_to_server"]})
        # num_cpus 0: Ray would otherwise reserve a core per replica; a short shutdown: nothing to drain here.
        options = dict(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=1)
        for app, cls in ((MTP_APP, EchoMTPReplica), (CODE2WAV_APP, EchoCode2WavReplica)):
            serve.run(serve.deployment(cls, name=cls.__name__, **options).bind(), name=app, route_prefix=f"/{app}")
        yield f"127.0.0.1:{proxy_port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- streams: one message out, its answer back ------------------------------------------------------------------


class Pipe(Protocol):
    async def send(self) -> None: ...  # send the next message (may return before it is on the wire)
    async def recv(self) -> None: ...  # wait for the next answer, checking its size
    async def close(self) -> None: ...


class BytesEcho:
    """The baseline: raw bytes on a grpc.aio stream."""

    def __init__(self, channel: grpc.aio.Channel, size: int):
        self.payload = os.urandom(size)
        self.call = channel.stream_stream(ECHO_METHOD)()

    async def send(self) -> None:
        await self.call.write(self.payload)

    async def recv(self) -> None:
        _check(len(await self.call.read()), len(self.payload))

    async def close(self) -> None:
        self.call.cancel()


class MTPStub:
    """MTP.Predict messages on a stream, written and read directly: the wire format's own cost."""

    def __init__(self, channel: grpc.aio.Channel, size: int, metadata: tuple = ()):
        self.hidden = torch.rand(size // 4)
        self.call = mtp_pb2_grpc.MTPStub(channel).Predict(metadata=metadata)
        self.frame = 0

    async def send(self) -> None:
        await self.call.write(PredictRequest(frames=[MTPFrame(request_id="hops", frame=self.frame,
                                                              hidden=to_proto(self.hidden), c0=0, greedy=True)]))
        self.frame += 1

    async def recv(self) -> None:
        answer = await self.call.read()
        _check(from_proto(answer.answers[0].embed_sum).numel(), self.hidden.numel())

    async def close(self) -> None:
        self.call.cancel()


class Calls:
    """A coroutine per message, answers taken in order: `RemoteMTP.predict` (which shares one stream among its
    callers) or a call per message (`RemoteAudioEncoder.encode`)."""

    def __init__(self, call: Callable[[], Awaitable[Tensor]], numel: int):
        self.call, self.numel = call, numel
        self.answers: asyncio.Queue[asyncio.Future[Tensor]] = asyncio.Queue()

    async def send(self) -> None:
        self.answers.put_nowait(asyncio.ensure_future(self.call()))

    async def recv(self) -> None:
        _check((await (await self.answers.get())).numel(), self.numel)

    async def close(self) -> None:
        pass  # every answer has been taken


class Decode:
    """A Code2Wav client's decode stream: one frame in, one chunk of samples out."""

    def __init__(self, code2wav, size: int):
        self.frame = (size // 4,) + (0,) * (NUM_CODES - 1)  # EchoCode2Wav answers with size // 4 samples
        self.frames: asyncio.Queue[tuple[int, ...]] = asyncio.Queue()
        self.chunks = code2wav.decode(self._frames())

    async def _frames(self) -> AsyncIterator[tuple[int, ...]]:
        while True:
            yield await self.frames.get()

    async def send(self) -> None:
        self.frames.put_nowait(self.frame)

    async def recv(self) -> None:
        _check((await anext(self.chunks)).numel(), int(self.frame[0]))

    async def close(self) -> None:
        await self.chunks.aclose()  # cancels the call


class HooksFeed:
    """A turn's Filter stream to the hook stage: a `tokens` message with one Thinker token, then its `released`."""

    TOKENS = [23811, 1879, 11, 419, 374, 264, 1273, 315, 279, 29677, 6021]  # " hello world, this is a test of..."

    def __init__(self, channel: grpc.aio.Channel, size: int):
        self.call = hooks_pb2_grpc.HooksStub(channel).Filter()
        self.sent = 0

    async def send(self) -> None:
        if self.sent == 0:
            await self.call.write(FilterRequest(start=FilterStart(request_id="hops")))
        await self.call.write(FilterRequest(tokens=Tokens(token_ids=[self.TOKENS[self.sent % len(self.TOKENS)]])))
        self.sent += 1

    async def recv(self) -> None:
        while (answer := await self.call.read()) is not grpc.aio.EOF:
            if answer.WhichOneof("kind") == "released":
                return _check(len(answer.released.token_ids), 1)
        raise RuntimeError("the hook stage ended the stream")

    async def close(self) -> None:
        self.call.cancel()


def _check(got: int, want: int) -> None:
    if got != want:
        raise RuntimeError(f"an answer of {got} elements, expected {want}")


# ---- routes and measurement -------------------------------------------------------------------------------------


@dataclass
class Route:
    name: str
    per_frame: bool  # taken every 80 ms codec frame: the 3x goal applies
    open: Callable[[int], Pipe]  # size in bytes -> an open stream
    sized: bool = True  # its messages have the row's size (not so for a token)


@dataclass
class Row:
    route: Route
    size: int
    round_trips: list[float]  # seconds
    messages: int  # for the throughput
    seconds: float

    @property
    def p50(self) -> float:
        return statistics.median(self.round_trips)

    @property
    def p90(self) -> float:
        return statistics.quantiles(self.round_trips, n=10)[-1]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


async def measure_all(address: str, proxy_address: str | None, sizes: list[int], messages: int,
                      window: int) -> list[Row]:
    """Every route at every size, routes taking turns in ROUNDS rounds; `proxy_address` adds the Ray routes."""
    async with _routes(address, proxy_address) as routes:
        rows = []
        for size in sizes:
            print(f"measuring {_size_name(size)} ...", flush=True)
            by_route = [Row(route, size, [], 0, 0.0) for route in routes]
            for _ in range(ROUNDS):
                for row in by_route:
                    await _measure(row, messages // ROUNDS, window)
            rows += by_route
        return rows


@asynccontextmanager
async def _routes(address: str, proxy_address: str | None) -> AsyncIterator[list[Route]]:
    async with AsyncExitStack() as stack:
        channel = await stack.enter_async_context(cluster_tls.channel(address, cluster_tls.from_env(), GRPC_OPTIONS))
        mtp, code2wav, encoder = RemoteMTP(channel), RemoteCode2Wav(channel), RemoteAudioEncoder(channel)
        stack.push_async_callback(mtp.close)
        routes = [
            Route(BASELINE, False, lambda size: BytesEcho(channel, size)),
            Route("MTP.Predict stub, to/from_proto", True, lambda size: MTPStub(channel, size)),
            Route("Talker->MTP: RemoteMTP", True, lambda size: _predicts(mtp, size)),
            Route("->Code2Wav: RemoteCode2Wav", True, lambda size: Decode(code2wav, size)),
            Route("->AudioEncoder: call per tensor", False, lambda size: _encodes(encoder, size)),
            Route("gateway->Hooks: one token", False, lambda size: HooksFeed(channel, size), sized=False),
        ]
        if proxy_address is not None:
            from services.serving.routes import ReplicaSet, RoutedCode2Wav, RoutedMTP

            # As the deployment's peers reach a stage: the replica list from Serve, then the replica's own port.
            routed_mtp = RoutedMTP(ReplicaSet(MTP_APP, RemoteMTP))
            routed_code2wav = RoutedCode2Wav(ReplicaSet(CODE2WAV_APP, RemoteCode2Wav))
            stack.push_async_callback(routed_mtp.replicas.close)
            stack.push_async_callback(routed_code2wav.replicas.close)
            proxy = await stack.enter_async_context(grpc.aio.insecure_channel(proxy_address, options=GRPC_OPTIONS))
            routes += [
                Route("Serve replica port: RoutedMTP", True, lambda size: _predicts(routed_mtp, size)),
                Route("Serve replica port: RoutedCode2Wav", True, lambda size: Decode(routed_code2wav, size)),
                Route("Serve gRPC proxy: MTP.Predict stub", False,
                      lambda size: MTPStub(proxy, size, metadata=(("application", MTP_APP),))),
            ]
        yield routes


def _predicts(mtp, size: int) -> Calls:
    """One `predict` per message: hidden [1, H] of `size` bytes, as the Talker sends each frame."""
    hidden, c0 = torch.rand(1, size // 4), torch.zeros(1, dtype=torch.long)

    async def call() -> Tensor:
        return (await mtp.predict(hidden, c0, True, None)).embed_sum

    return Calls(call, size // 4)


def _encodes(encoder: RemoteAudioEncoder, size: int) -> Calls:
    """One `encode` call per message: features of `size` bytes, sent as pieces, come back as the embeddings."""
    features, mask = torch.rand(1, size // 4), torch.ones(1, 1, dtype=torch.long)
    return Calls(lambda: encoder.encode(features, mask), size // 4)


async def _measure(row: Row, messages: int, window: int) -> None:
    """Round trips of `messages` messages one at a time, then `messages` more with `window` in flight; adds them to
    `row`."""
    pipe = row.route.open(row.size)
    try:
        for _ in range(WARMUP):
            await pipe.send()
            await pipe.recv()
        for _ in range(messages):
            start = time.perf_counter()
            await pipe.send()
            await pipe.recv()
            row.round_trips.append(time.perf_counter() - start)

        slots = asyncio.Semaphore(window)

        async def send_all() -> None:
            for _ in range(messages):
                await slots.acquire()
                await pipe.send()

        sender = asyncio.create_task(send_all())
        try:
            await pipe.recv()  # the clock starts at the first answer: the window is full from then on
            slots.release()
            start = time.perf_counter()
            for _ in range(messages - 1):
                await pipe.recv()
                slots.release()
            row.seconds += time.perf_counter() - start
            row.messages += messages - 1
            await sender
        finally:
            sender.cancel()
    finally:
        await pipe.close()


# ---- the table --------------------------------------------------------------------------------------------------


def _size_name(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


COLUMNS = ("size", "p50 ms", "p90 ms", "p50 x", "msg/s", "MB/s", "tput x")


def _ratio(x: float) -> str:
    """Two decimals, or three significant digits below 0.01: a baseline that stalled (a busy machine) makes the
    other routes' ratios tiny, and "0.00" would read as no figure at all."""
    return f"{x:.2f}" if x >= 0.01 else f"{x:.3g}"


def print_table(rows: list[Row]) -> None:
    """One line per route and size; then whether the per-frame routes meet the goal."""
    width = max(len(row.route.name) for row in rows) + 2
    print("route".ljust(width) + "".join(c.rjust(9) for c in COLUMNS))
    base = {row.size: row for row in rows if row.route.name == BASELINE}
    misses = []
    for row in rows:
        ref = base[row.size]
        slower = row.p50 / ref.p50
        if row.route.per_frame and slower > GOAL:
            misses.append(f"{row.route.name} at {_size_name(row.size)}: {slower:.1f}x")
        values = (_size_name(row.size) if row.route.sized else "token", f"{row.p50 * 1e3:.3f}",
                  f"{row.p90 * 1e3:.3f}", _ratio(slower), f"{row.rate:.0f}",
                  f"{row.rate * row.size / 1e6:.1f}" if row.route.sized else "-", _ratio(ref.rate / row.rate))
        print(row.route.name.ljust(width) + "".join(v.rjust(9) for v in values))
        if row is _last(rows, row.size):
            print()
    verdict = "yes" if not misses else "no: " + "; ".join(misses)
    print(f"per-frame routes within {GOAL:g}x of plain grpc.aio (p50 round trip): {verdict}")


def _last(rows: list[Row], size: int) -> Row:
    return [row for row in rows if row.size == size][-1]


if __name__ == "__main__":
    main()
