"""The wire format: tensor codec, piece streams, a real gRPC server with health and reflection, generated code."""

from __future__ import annotations

import pickle

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.errors import InvalidInput, ResourceExhausted
from services.wire import codegen
from services.wire.gen.omni.v1 import audio_encoder_pb2, audio_encoder_pb2_grpc, omni_pb2
from services.wire.gen.omni.v1.tensor_pb2 import Tensor, TensorPiece
from services.wire.server import GRPC_OPTIONS, MAX_MESSAGE_BYTES, SERVICE_NAMES, add_standard_services
from services.wire.tensors import DTYPES, PieceAssembler, from_proto, to_pieces, to_proto
from tests.helpers import assert_rejected_for_size

SHAPES = [(), (0,), (3, 0, 2), (7,), (2, 3, 4)]
# tensors.py silences torch's one-time warning about its (documented) zero-copy decode at import; pytest resets
# warning filters around each test, so the same filter is repeated here.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, shape, generator=g, dtype=dtype)
    if t.numel() >= 2:  # both extremes
        t.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return t


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bits (NaNs included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assemble(pieces, max_bytes: int = 1 << 30) -> dict[str, torch.Tensor]:
    assembler = PieceAssembler(max_bytes)
    out = {}
    for piece in pieces:
        if done := assembler.add(piece):
            out[done.name] = done.tensor
    assembler.finish()
    return out


# ---- whole tensors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(dtype_name, shape):
    t = sample(DTYPES[dtype_name], shape)
    msg = Tensor.FromString(to_proto(t).SerializeToString())
    assert msg.dtype == dtype_name and list(msg.shape) == list(shape)
    assert same(from_proto(msg), t)
    assert same(from_proto(msg, copy=True), t)
    if dtype_name != "bfloat16":  # numpy has no bfloat16
        assert same(from_proto(to_proto(t.numpy())), t)


def test_bfloat16_bits_are_exact():
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)  # every pattern: NaNs, infs, denormals
    t = bits.view(torch.bfloat16)
    back = from_proto(to_proto(t))
    assert back.dtype == torch.bfloat16
    assert torch.equal(back.view(torch.int16), bits)


def test_non_contiguous_input_and_copy_semantics():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T  # a strided view
    msg = to_proto(t)
    assert same(from_proto(msg), t.contiguous())
    owned = from_proto(msg, copy=True)
    owned += 1  # writable, and independent of the message
    assert same(from_proto(msg), t.contiguous())


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, dtype=torch.float64), "cannot cross the wire"),
    (np.zeros(2, dtype=np.int8), "cannot cross the wire"),
    ([1.0, 2.0], "expected a torch.Tensor"),
])
def test_to_proto_rejects_unsupported(bad, match):
    with pytest.raises(InvalidInput, match=match):
        to_proto(bad)


@pytest.mark.parametrize("msg, match", [
    (Tensor(dtype="float64", shape=[1], data=b"\0" * 8), "unknown dtype"),
    (Tensor(dtype="float32", shape=[2], data=b"\0" * 7), "needs 8 bytes, got 7"),
    (Tensor(dtype="int32", shape=[-1], data=b""), "negative dimension"),
    (Tensor(dtype="bool", shape=[2], data=b"\x01\x02"), "bytes other than 0 and 1"),
])
def test_from_proto_rejects_malformed(msg, match):
    with pytest.raises(InvalidInput, match=match):
        from_proto(msg)


# ---- pieces ---------------------------------------------------------------------------------------------


def test_pieces_round_trip_20mb():
    t = sample(torch.float32, (1280, 4096))  # 20 MiB
    piece_bytes = 64 << 10
    pieces = [TensorPiece.FromString(p.SerializeToString()) for p in to_pieces("hidden", t, piece_bytes)]
    assert len(pieces) == t.numel() * 4 // piece_bytes
    assert [p.offset for p in pieces] == [i * piece_bytes for i in range(len(pieces))]
    assert all(len(p.data) == piece_bytes for p in pieces)
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert same(assemble(pieces)["hidden"], t)


def test_pieces_uneven_sizes_and_several_tensors_in_one_stream():
    tensors = {
        "a": sample(torch.bfloat16, (3, 333)),  # 1998 bytes: pieces of 256 leave a short last one
        "empty": sample(torch.int64, (0, 5)),
        "scalar": sample(torch.bool, ()),
        "b": sample(torch.int16, (10,)),
    }
    pieces = [p for name, t in tensors.items() for p in to_pieces(name, t, piece_bytes=256)]
    empty = [p for p in pieces if p.name == "empty"]
    assert empty == [TensorPiece(name="empty", dtype="int64", shape=[0, 5], last=True)]
    out = assemble(pieces)
    assert list(out) == list(tensors)
    assert all(same(out[k], v) for k, v in tensors.items())


def _pieces(n: int = 10, piece_bytes: int = 8) -> list[TensorPiece]:
    return list(to_pieces("x", torch.arange(n, dtype=torch.float32), piece_bytes))  # 40 bytes: 5 pieces


def _edited(piece: TensorPiece, **fields) -> TensorPiece:
    out = TensorPiece()
    out.CopyFrom(piece)
    for k, v in fields.items():
        if k == "shape":
            del out.shape[:]
            out.shape.extend(v)
        else:
            setattr(out, k, v)
    return out


@pytest.mark.parametrize("mutate, match", [
    (lambda ps: [_edited(ps[0], dtype="complex64"), *ps[1:]], "unknown dtype 'complex64'"),
    (lambda ps: [_edited(ps[0], shape=[2, -5]), *ps[1:]], "negative dimension"),
    (lambda ps: [ps[0], _edited(ps[1], shape=[11]), *ps[2:]], "while tensor 'x'"),  # shape changes mid-tensor
    (lambda ps: [ps[0], _edited(ps[1], dtype="int32"), *ps[2:]], "while tensor 'x'"),
    (lambda ps: [ps[0], _edited(ps[1], name="y"), *ps[2:]], "while tensor 'x'"),  # interleaved tensors
    (lambda ps: [ps[0], ps[2], ps[1], *ps[3:]], "piece at byte 16, expected byte 8"),  # out of order
    (lambda ps: [ps[0], ps[0], *ps[1:]], "piece at byte 0, expected byte 8"),  # repeated
    (lambda ps: [_edited(ps[0], offset=4), *ps[1:]], "piece at byte 4, expected byte 0"),
    (lambda ps: [*ps[:4], _edited(ps[4], data=b"\0" * 12)], "past its size of 40 bytes"),  # overflow
    (lambda ps: [*ps[:3], _edited(ps[3], last=True)], "last piece at byte 32 of 40"),  # declared size not reached
    (lambda ps: ps[:4], "stream ended inside tensor 'x' \\(32 of 40 bytes\\)"),
    (lambda ps: [_edited(ps[0], dtype="bool", shape=[8], data=b"\0\1\2\0\0\0\0\0", last=True)], "other than 0 and 1"),
])
def test_assembler_rejects_malformed_streams(mutate, match):
    with pytest.raises(InvalidInput, match=match):
        assemble(mutate(_pieces()))


def test_assembler_caps_declared_bytes():
    huge = TensorPiece(name="x", dtype="float32", shape=[1 << 40, 1 << 40], offset=0, data=b"")
    with pytest.raises(ResourceExhausted, match="exceeds the limit"):
        PieceAssembler(max_bytes=1 << 30).add(huge)
    # The cap is on the stream's total: two tensors that fit alone do not fit together.
    assembler = PieceAssembler(max_bytes=60)
    assert all(assembler.add(p) is None for p in _pieces()[:-1])
    assert assembler.add(_pieces()[-1]).name == "x"
    with pytest.raises(ResourceExhausted, match="40 bytes already received"):
        assembler.add(_pieces()[0])


# ---- a real server --------------------------------------------------------------------------------------


class EchoAudioEncoder(audio_encoder_pb2_grpc.AudioEncoderServicer):
    """Test-only stub: assembles whatever tensors arrive and streams them back."""

    async def EncodeAudio(self, request_iterator, context):
        assembler = PieceAssembler(max_bytes=256 << 20)
        received = []
        async for request in request_iterator:
            if request.WhichOneof("kind") == "piece":
                if done := assembler.add(request.piece):
                    received.append(done)
        assembler.finish()
        for name, tensor in received:
            for piece in to_pieces(name, tensor):
                yield audio_encoder_pb2.EncodeAudioResponse(piece=piece)


@pytest.fixture
async def server():
    server = grpc.aio.server(options=GRPC_OPTIONS)
    audio_encoder_pb2_grpc.add_AudioEncoderServicer_to_server(EchoAudioEncoder(), server)
    health = await add_standard_services(server, [SERVICE_NAMES["AudioEncoder"]])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as channel:
        yield channel, health
    await server.stop(grace=None)


async def test_64mib_tensor_streams_through_a_server(server):
    channel, _ = server
    t = sample(torch.float32, (16 << 20,))  # 64 MiB, 8x the message limit

    def requests():
        yield audio_encoder_pb2.EncodeAudioRequest(start=audio_encoder_pb2.EncodeAudioStart(request_id="r1"))
        for piece in to_pieces("input_features", t):
            yield audio_encoder_pb2.EncodeAudioRequest(piece=piece)

    stub = audio_encoder_pb2_grpc.AudioEncoderStub(channel)
    assembler = PieceAssembler(max_bytes=256 << 20)
    out = {}
    async for response in stub.EncodeAudio(requests()):
        if done := assembler.add(response.piece):
            out[done.name] = done.tensor
    assembler.finish()
    assert list(out) == ["input_features"] and same(out["input_features"], t)


async def test_message_limit_is_enforced(server):
    channel, _ = server
    too_big = TensorPiece(name="x", dtype="uint8", shape=[MAX_MESSAGE_BYTES], data=bytes(MAX_MESSAGE_BYTES), last=True)
    call = audio_encoder_pb2_grpc.AudioEncoderStub(channel).EncodeAudio(
        iter([audio_encoder_pb2.EncodeAudioRequest(piece=too_big)]))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert_rejected_for_size(err.value)
    small = sample(torch.float32, (4,))
    echoed = [r async for r in audio_encoder_pb2_grpc.AudioEncoderStub(channel).EncodeAudio(
        iter([audio_encoder_pb2.EncodeAudioRequest(piece=p) for p in to_pieces("x", small)]))]
    assert len(echoed) == 1  # the channel and server still serve


async def test_health_serves_and_drains(server):
    channel, health = server
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ("", "omni.v1.AudioEncoder"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="omni.v1.Thinker"))  # not served here
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await health.enter_graceful_shutdown()
    reply = await stub.Check(health_pb2.HealthCheckRequest(service="omni.v1.AudioEncoder"))
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_services_under_proto_names(server):
    channel, _ = server
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="omni.v1.AudioEncoder"),
    ]
    listed, found = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    assert {s.name for s in listed.list_services_response.service} == {
        "omni.v1.AudioEncoder", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    from google.protobuf.descriptor_pb2 import FileDescriptorProto

    names = {FileDescriptorProto.FromString(b).name for b in found.file_descriptor_response.file_descriptor_proto}
    assert "omni/v1/audio_encoder.proto" in names


# ---- generated code -------------------------------------------------------------------------------------


def test_service_names():
    assert SERVICE_NAMES == {n: f"omni.v1.{n}" for n in (
        "AudioEncoder", "VisionEncoder", "Thinker", "Hooks", "Talker", "MTP", "Code2Wav", "Omni")}


def test_generated_messages_live_in_the_package_and_pickle():
    msg = omni_pb2.ConverseRequest(config=omni_pb2.ConverseConfig(session_id="s", metadata={"k": "v"}))
    assert type(msg).__module__ == "services.wire.gen.omni.v1.omni_pb2"  # what pickle imports (Ray passes protos)
    assert pickle.loads(pickle.dumps(msg)) == msg


def test_generated_code_is_fresh(tmp_path):
    codegen.generate(tmp_path)

    def tree(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}

    fresh, committed = tree(tmp_path), tree(codegen.GEN_DIR)
    stale = sorted(k for k in fresh.keys() | committed.keys() if fresh.get(k) != committed.get(k))
    assert not stale, f"services/wire/gen is stale ({', '.join(stale)}): run scripts/gen_protos.sh"
