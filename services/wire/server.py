"""gRPC plumbing shared by every stage server and client: channel options, service names, health and reflection."""

from __future__ import annotations

from collections.abc import Iterable

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
