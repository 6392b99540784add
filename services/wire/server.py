"""gRPC plumbing shared by every stage server and client: channel options, service names, health and reflection,
and the interceptor that closes a streaming handler in its own call (`CloseStreams`)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from contextlib import aclosing

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.wire.gen.omni.v1 import (
    audio_encoder_pb2,
    code2wav_pb2,
    hooks_pb2,
    mtp_pb2,
    omni_pb2,
    talker_pb2,
    thinker_pb2,
    vision_encoder_pb2,
)

MAX_MESSAGE_BYTES = 8 << 20
# Big tensors cross as 1 MiB TensorPieces, so no message needs gRPC's 4 MiB default receive limit, let alone more.
# 8 MiB leaves headroom for the one client message that is not split: a video frame (an encoded image) of the
# Converse API. Raising the limit instead of streaming would make every receiver buffer whole tensors per message.
GRPC_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

# Full names of the services in protos/omni/v1, by short name: "Code2Wav" -> "omni.v1.Code2Wav".
SERVICE_NAMES: dict[str, str] = {
    name: service.full_name
    for module in (audio_encoder_pb2, vision_encoder_pb2, thinker_pb2, hooks_pb2, talker_pb2, mtp_pb2,
                   code2wav_pb2, omni_pb2)
    for name, service in module.DESCRIPTOR.services_by_name.items()
}


async def add_standard_services(server: grpc.aio.Server, service_names: Iterable[str],
                                reflection_on: bool = True) -> health.aio.HealthServicer:
    """Serve `grpc.health.v1.Health` (SERVING for the server, "", and each given full service name) and, with
    `reflection_on`, server reflection for those services (the public API has it; internal stage ports do not:
    it would describe them to whoever reaches one). Call before `server.start()`; returns the health servicer,
    e.g. for `enter_graceful_shutdown()` when draining."""
    names = list(service_names)
    servicer = health.aio.HealthServicer()
    for name in ["", *names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if reflection_on:
        reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


class CloseStreams(grpc.aio.ServerInterceptor):
    """Runs each streaming handler's async generator itself and closes it in the call's own task. grpc.aio leaves
    the generator open when a write fails (the client cancelled the call, as a stage client does once it has read
    the stream's `end`; grpc/grpc#42295); the garbage collector then closes it in another task, so the handler's
    cleanup runs late, and OpenTelemetry's server interceptor, whose context is attached across its yields, logs
    "Failed to detach context" (open-telemetry/opentelemetry-python-contrib#2357). Put it first: the outermost."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not handler.response_streaming:
            return handler
        streams_in = handler.request_streaming
        behavior = handler.stream_stream if streams_in else handler.unary_stream
        if not inspect.isasyncgenfunction(behavior):
            return handler

        async def respond(request, context):
            async with aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    await context.write(response)

        wrap = grpc.stream_stream_rpc_method_handler if streams_in else grpc.unary_stream_rpc_method_handler
        return wrap(respond, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
