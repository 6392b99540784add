"""gRPC servicers of the stages: each translates its service's messages into calls of a `services.stages` object
and domain errors into status codes, nothing else. The stage object may be in-process (`Local*`) or itself a gRPC
client (`services.remote`), so the same servicer runs anywhere: a test, a Ray Serve replica, a bare process.

This package also holds what servicers and stage clients share: the request id (`services.tracing`), sampling
params on the wire, the reading of a request stream's `start` and tensor pieces, and `serve_stage`, which runs one
servicer on its own port (continuing callers' traces).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from dataclasses import fields

import grpc
from torch import Tensor

from services import tracing
from services.engines.kv_pages import KEEP_NONE, KEEP_SESSION, KEEP_TURN
from services.engines.sampling import SamplingParams
from services.errors import InvalidInput
from services.tracing import REQUEST_ID, request_id  # noqa: F401  (re-exported for the servicers and clients)
from services.wire import cluster_tls
from services.wire.cluster_tls import ClusterCredential
from services.wire.gen.omni.v1 import common_pb2
from services.wire.server import GRPC_OPTIONS, SERVICE_NAMES, CloseStreams, add_standard_services
from services.wire.tensors import PieceAssembler


async def serve_stage(servicer, port: int = 0, host: str = "[::]", options: list[tuple[str, int]] = GRPC_OPTIONS,
                      credential: ClusterCredential | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a gRPC server for one stage servicer (with health, without reflection: the port is internal); return
    it and its bound port. `port=0` picks a free port; `credential` (`services.wire.cluster_tls`): mutual TLS,
    only peers holding it get through the handshake; None: plaintext. Stop it with `await server.stop(grace)`."""
    tracing.setup()
    server = grpc.aio.server(options=options, interceptors=[CloseStreams(), *tracing.server_interceptors()])
    servicer.add_to_server(servicer, server)
    await add_standard_services(server, [SERVICE_NAMES[servicer.service]], reflection_on=False)
    bound = cluster_tls.add_port(server, _host_port(host, port), credential)
    await server.start()
    return server, bound


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"  # a bare IPv6


KEEP_TO_PROTO = {KEEP_SESSION: common_pb2.KEEP_KV_SESSION, KEEP_TURN: common_pb2.KEEP_KV_TURN,
                 KEEP_NONE: common_pb2.KEEP_KV_NONE}
_KEEP_FROM_PROTO = {v: k for k, v in KEEP_TO_PROTO.items()}


def keep_from_proto(keep: int) -> str:
    return _KEEP_FROM_PROTO.get(keep, KEEP_NONE)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(greedy=params.greedy, temperature=params.temperature, top_k=params.top_k,
                                    top_p=params.top_p, repetition_penalty=params.repetition_penalty)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Unset fields take SamplingParams' defaults; invalid values raise InvalidInput."""
    return SamplingParams(**{f.name: getattr(msg, f.name) for f in fields(SamplingParams) if msg.HasField(f.name)})


async def read_start(requests: AsyncIterator, service: str):
    """The stream's first message, which must be `start`."""
    msg = await anext(requests, None)
    kind = None if msg is None else msg.WhichOneof("kind")
    if kind != "start":
        raise InvalidInput(f"{service}: the first message must be start, got {kind or 'the end of the stream'}")
    return msg.start


async def read_tensors(requests: AsyncIterator, piece_field: str, allowed: Collection[str],
                       until: Collection[str] = ()) -> tuple[dict[str, Tensor], object | None]:
    """Assemble the `piece_field` pieces of a request stream into named tensors, up to the first message of a kind
    in `until` (returned with them) or the caller's half-close (None)."""
    assembler = PieceAssembler()
    tensors: dict[str, Tensor] = {}
    async for msg in requests:
        kind = msg.WhichOneof("kind")
        if kind in until:
            assembler.finish()
            return tensors, msg
        if kind != piece_field:
            raise InvalidInput(f"unexpected {kind or 'empty'} message among the {piece_field} tensors")
        if done := assembler.add(getattr(msg, piece_field)):
            if done.name not in allowed:
                raise InvalidInput(f"unknown tensor {done.name!r}; expected {', '.join(sorted(allowed))}")
            if done.name in tensors:
                raise InvalidInput(f"tensor {done.name!r} was sent twice")
            tensors[done.name] = done.tensor
    assembler.finish()
    return tensors, None


def required(tensors: dict[str, Tensor], *names: str) -> list[Tensor]:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise InvalidInput(f"missing tensor{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return [tensors[n] for n in names]
