"""The Omni API's observable contract, checked against any running gateway: the in-process one
(tests/test_gateway.py) and the Ray Serve deployment (tests/test_serving.py). `omni chat` must equal
`omni generate` on the same input; a session continues a conversation; concurrent streams don't interfere."""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import soundfile as sf

from services.chat_cmd import add_chat_arguments, run_chat
from services.client import OmniClient
from services.conductor import Conductor
from services.events import AudioChunk, TurnSummary, float_to_pcm16
from services.generate import add_generate_arguments, build_request, write_outputs

INPUTS = {
    "text": ["--text", "Hello world, this is Qwen."],
    "audio": ["--text", "What do you hear?", "--audio", "{audio}"],
    "image": ["--text", "Describe it.", "--image", "{image}", "--speaker", "chelsie"],
    "video": ["--text", "And this?", "--video", "{video}", "--video-fps", "2"],
    # The parts keep their command-line order: text between media, an image before an audio.
    "interleaved": ["--image", "{image}", "--text", "Is this what ", "--audio", "{audio}", "--text", " sounds like?"],
}


def parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


async def collect(conductor: Conductor, req) -> tuple[TurnSummary, np.ndarray]:
    events = [e async for e in conductor.run(req)]
    chunks = [e.samples for e in events if isinstance(e, AudioChunk)]
    return events[-1], np.concatenate(chunks) if chunks else np.zeros(0, np.float32)


def generate(stages, argv: list[str], out) -> tuple[dict, np.ndarray]:
    """`omni generate` in process (the same request building and outputs, on already loaded stages)."""
    args = parse(add_generate_arguments, ["--model", "unused", "--greedy", "--output", str(out / "gen.wav"),
                                          "--json", str(out / "gen.json"), *argv])
    summary, samples = asyncio.run(collect(Conductor(stages), build_request(args)))
    write_outputs(summary, samples, args.output, args.json)
    return json.loads((out / "gen.json").read_text()), sf.read(out / "gen.wav", dtype="int16")[0]


def chat(address: str, argv: list[str], out) -> tuple[dict, np.ndarray]:
    run_chat(parse(add_chat_arguments, ["--address", address, "--greedy", "--output", str(out / "chat.wav"),
                                        "--json", str(out / "chat.json"), *argv]))
    return json.loads((out / "chat.json").read_text()), sf.read(out / "chat.wav", dtype="int16")[0]


def assert_same(chat_result, generate_result) -> dict:
    (ours, our_wav), (ref, ref_wav) = chat_result, generate_result
    for key in ("text", "thinker_token_ids", "codes", "sample_rate", "num_samples", "speaker", "finish_reason"):
        assert ours[key] == ref[key], key
    assert len(ours["codes"]) > 0 and our_wav.size == ours["num_samples"]
    np.testing.assert_array_equal(our_wav, ref_wav)
    return ours


SHORT = ["--max-new-tokens", "10", "--max-audio-frames", "30"]


def check_chat_equals_generate(address: str, stages, media: dict, out, inputs: list[str]) -> None:
    argv = [a.format(**media) for a in inputs] + SHORT
    assert_same(chat(address, argv, out), generate(stages, argv, out))


def check_two_turn_session(address: str, stages, media: dict, out, session: str) -> dict:
    """Turn 2 with the session id equals `omni generate --conversation` holding turn 1; returns turn 1's result."""
    first = ["--text", "Listen to this.", "--audio", media["audio"], *SHORT]
    turn1 = assert_same(chat(address, ["--session", session, *first], out), generate(stages, first, out))
    conversation = out / "conversation.json"
    conversation.write_text(json.dumps([  # turn 1's parts in their order on the command line
        {"role": "user", "content": [{"type": "text", "text": "Listen to this."},
                                     {"type": "audio", "audio": media["audio"]}]},
        {"role": "assistant", "content": turn1["text"]},
    ]))
    second = ["--text", "Once more, please.", *SHORT]
    assert_same(chat(address, ["--session", session, *second], out),
                generate(stages, ["--conversation", str(conversation), *second], out))
    return turn1


def check_four_concurrent_streams(address: str, media: dict) -> None:
    """Four different turns at once, each equal to the same turn run alone."""
    requests = [
        dict(text="Hello world, this is Qwen.", max_new_tokens=12, max_audio_frames=40),
        dict(text="What do you hear?", audios=[media["audio"]], max_new_tokens=10, max_audio_frames=30),
        dict(text="Describe it.", images=[media["image"]], speaker="aiden", max_new_tokens=10, max_audio_frames=30),
        dict(text="Just text.", audio_output=False, max_new_tokens=12),
    ]

    async def run_all():
        async with OmniClient(address) as client:
            return await asyncio.gather(*(client.collect(greedy=True, **r) for r in requests))

    concurrent = asyncio.run(run_all())
    for r, (summary, samples) in zip(requests, concurrent):
        single, single_samples = OmniClient(address).converse_sync(greedy=True, **r)
        assert summary.thinker_token_ids == single.thinker_token_ids and summary.text == single.text
        assert summary.codes == single.codes and summary.num_samples == single.num_samples == samples.size
        np.testing.assert_array_equal(float_to_pcm16(samples), float_to_pcm16(single_samples))
    assert concurrent[3][0].codes == [] and concurrent[3][0].speaker is None
