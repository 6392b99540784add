"""A text-only variant served on Ray: `omni serve`'s config fitted to the tiny Thinking checkpoint runs the gateway,
audio, vision, thinker and hooks applications and no speech stage; `omni chat` through Serve's proxy equals the
reference `generate`; asking it for speech is INVALID_ARGUMENT naming the model; Describe and health say it serves
text. One small cluster for the module."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.chat_cmd import add_chat_arguments, run_chat
from services.client import ConverseError, OmniClient
from services.conductor import TurnRequest
from services.engines.sampling import SamplingParams
from services.serving import serve_cmd
from services.turn_parts import audio_part, image_part, text_part
from services.wire.server import SERVICE_NAMES
from tests.api_contract import parse
from tests.cluster import deployed
from tests.test_conductor import reference_run

LOCAL = Path(__file__).resolve().parents[1] / "deploy" / "local.yaml"
TEXT_APPS = {"omni", "audio", "vision", "thinker", "hooks"}


def test_the_config_is_fitted_to_a_checkpoint_without_a_talker(tiny_thinking, tiny_ckpt):
    config = serve_cmd.load_config(LOCAL, model=tiny_thinking)
    variant, left_out = serve_cmd.fit_to_checkpoint(config)
    assert variant.kind == "thinking" and sorted(left_out) == ["code2wav", "mtp", "talker"]
    assert {app.name for app in config.applications} == TEXT_APPS
    gateway = next(app for app in config.applications if app.name == "omni")
    assert gateway.args["stages"] == {"audio": "audio", "vision": "vision", "thinker": "thinker"}
    instruct = serve_cmd.load_config(LOCAL, model=tiny_ckpt)
    assert serve_cmd.fit_to_checkpoint(instruct)[1] == [] and len(instruct.applications) == 8


@pytest.fixture(scope="module")
def cluster(tiny_thinking):
    config = serve_cmd.load_config(LOCAL, model=tiny_thinking)
    serve_cmd.fit_to_checkpoint(config)
    with deployed(config) as running:
        yield running


@pytest.fixture(scope="module")
def thinking_processor(tiny_thinking):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_thinking)


def test_no_speech_application_runs(cluster):
    from ray import serve

    assert set(serve.status().applications) == TEXT_APPS


@pytest.mark.parametrize("inputs", ["text", "audio_and_image"])
def test_chat_through_serve_equals_the_reference(cluster, reference_thinking, thinking_processor, media, tmp_path,
                                                 inputs):
    argv = ["--text", "What is it?", "--max-new-tokens", "8"]
    req = TurnRequest(parts=[text_part("What is it?")], audio_output=False, max_new_tokens=8,
                      thinker_sampling=SamplingParams(greedy=True))
    if inputs == "audio_and_image":  # after the text: the parts keep their command-line order
        argv += ["--audio", media["audio"], "--image", media["image"]]
        req.parts = [*req.parts, audio_part(media["audio"]), image_part(media["image"])]
    run_chat(parse(add_chat_arguments, ["--address", cluster.address, "--greedy", "--no-audio", "--json",
                                        str(tmp_path / "chat.json"), *argv]))
    result = json.loads((tmp_path / "chat.json").read_text())
    ids, _ = reference_run(reference_thinking, thinking_processor, req)
    assert result["thinker_token_ids"] == ids and result["codes"] == [] and result["speaker"] is None


def test_speech_is_refused_naming_the_model_and_describe_says_text(cluster):
    with pytest.raises(ConverseError) as e:
        OmniClient(cluster.address).converse_sync(text="Speak!", greedy=True, max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Qwen3-Omni Thinking serves text only (the checkpoint has no Talker)" in e.value.details

    async def describe():
        async with OmniClient(cluster.address) as client:
            return await client.describe()

    info = asyncio.run(describe())
    assert (info.variant, info.output_modalities, info.speakers, info.reasoning) == ("thinking", ("text",), (), True)


async def test_health_says_which_modalities_are_served(cluster):
    async with grpc.aio.insecure_channel(cluster.address) as proxy:
        call = health_pb2_grpc.HealthStub(proxy).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAMES["Omni"]), metadata=(("application", "omni"),),
            timeout=30)
        assert (await call).status == health_pb2.HealthCheckResponse.SERVING
        trailers = dict(await call.trailing_metadata())
    assert trailers["omni-variant"] == "thinking" and trailers["omni-output-modalities"] == "text"
