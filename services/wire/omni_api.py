"""The Omni service's registration on a gRPC server, with a request deserializer that never fails.

With the generated one, a message protobuf cannot parse (a `string` field holding invalid UTF-8, say) raises inside
grpc: a grpc.aio server ends the call with UNKNOWN naming the DecodeError, and Serve's gRPC proxy, which deserializes
before the replica sees anything, just ends the request stream, so the gateway answered "the stream ended before
end_of_turn". Here such a message arrives as an `Undecodable` saying what is wrong (which field is not UTF-8), and
the gateway answers INVALID_ARGUMENT with that. Use `add_OmniServicer_to_server` from this module wherever the
generated one was: `start_gateway`, and the proxy's `grpc_servicer_functions` in `deploy/*.yaml`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from services.wire.gen.omni.v1 import omni_pb2

_SERVICE = omni_pb2.DESCRIPTOR.services_by_name["Omni"]
_PARTS = {"config": "the config", "text": "a text part", "audio": "an audio part", "image": "an image part",
          "video_frame": "a video frame"}


@dataclass(frozen=True)
class Undecodable:
    """A request message protobuf could not parse (picklable: Serve's proxy passes it to the replica)."""

    reason: str


def parse_converse_request(data: bytes) -> omni_pb2.ConverseRequest | Undecodable:
    try:
        return omni_pb2.ConverseRequest.FromString(data)
    except DecodeError:
        return Undecodable(_why(data))


def add_OmniServicer_to_server(servicer, server) -> None:  # noqa: N802 (the generated function's name)
    """The generated `add_OmniServicer_to_server`, with `parse_converse_request` for Converse. Built from the
    service's descriptor, so a method added to the proto is registered here too."""
    handlers = {}
    for method in _SERVICE.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[method.client_streaming, method.server_streaming]
        parse = parse_converse_request if request is omni_pb2.ConverseRequest else request.FromString
        handlers[method.name] = kind(getattr(servicer, method.name), request_deserializer=parse,
                                     response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(_SERVICE.full_name, handlers)


def _why(data: bytes) -> str:
    """What is wrong with a ConverseRequest that does not parse, in a client's terms."""
    try:
        twin = _bytes_twin().FromString(data)
    except DecodeError:
        return "a message is not a valid omni.v1.ConverseRequest (protobuf could not parse it)"
    bad = _bad_utf8(twin, omni_pb2.ConverseRequest.DESCRIPTOR)
    if bad is None:  # parses with bytes for strings, yet not with strings: still a string's encoding
        return "a message holds a string field that is not valid UTF-8"
    part = _PARTS.get(bad.split(".")[0], "a message")
    return f"{part} is not valid UTF-8: field {bad} (protobuf strings must be UTF-8)"


@functools.cache
def _bytes_twin() -> type:
    """ConverseRequest's class in a pool of its own where every string field is bytes: it parses any message the
    real one rejects for its UTF-8 only, so the bad field can be found. Maps become repeated key/value entries, the
    same on the wire (a map key cannot be bytes)."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: descriptor.FileDescriptor) -> None:
        if file.name in added:
            return
        for dep in file.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        stack = list(proto.message_type)
        while stack:
            msg = stack.pop()
            stack.extend(msg.nested_type)
            msg.options.ClearField("map_entry")  # a map becomes repeated entries (same wire format): bytes keys
            for f in msg.field:
                if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                    f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
        pool.Add(proto)
        added.add(file.name)

    add(omni_pb2.DESCRIPTOR)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(omni_pb2.ConverseRequest.DESCRIPTOR.full_name))


def _bad_utf8(msg, real: descriptor.Descriptor, path: str = "") -> str | None:
    """The path of the first field of `msg` (a bytes twin) that is a string in `real` and not valid UTF-8."""
    for field, value in msg.ListFields():
        where, real_field = f"{path}{field.name}", real.fields_by_name[field.name]
        repeated = field.is_repeated  # a map: its entries
        for i, item in enumerate(value if repeated else [value]):
            at = f"{where}[{i}]" if repeated else where
            if real_field.type == descriptor.FieldDescriptor.TYPE_STRING and not _utf8(item):
                return at
            if real_field.message_type is not None and (bad := _bad_utf8(item, real_field.message_type, f"{at}.")):
                return bad
    return None


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
