"""Issue 12: the report's other two released models. Tiny Thinking and Captioner checkpoints are real checkpoints
without a Talker; the pipeline follows the checkpoint and equals the reference `generate` (greedy ids); a Thinking
model's reasoning streams apart from its answer, through the filters as reasoning and never to the Talker (driven by
a scripted Thinker: random weights never write `<think>`); the Captioner refuses what it was not trained on; over
gRPC, Describe and the error statuses name the variant."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import shutil
from types import SimpleNamespace

import grpc
import pytest

from services.checkpoint.loading import Checkpoint
from services.checkpoint.variant import CAPTIONER_RULES, ReasoningTags, checkpoint_names, detect_variant, reasoning_tags
from services.cli import main as omni
from services.client import ConverseError, OmniClient
from services.conductor import Conductor, TurnRequest
from services.engines.bundle import Engines
from services.engines.sampling import SamplingParams
from services.errors import CheckpointError, InvalidInput
from services.events import ReasoningDelta, TextDelta, TurnSummary
from services.gateway import OmniServicer, start_gateway
from services.generate import TextPrinter
from services.hooks import FilterChain, HookContext, Link, Redact, Release, RemoteFilter, TextFilter
from services.remote import RemoteHooks
from services.servicers import serve_stage
from services.servicers.hooks import HooksServicer
from services.sessions import InProcessSessions
from services.stages import Stages
from services.turn_parts import audio_part, image_part, text_part
from services.wire.gen.omni.v1 import text_filter_pb2_grpc
from services.wire.gen.omni.v1.text_filter_pb2 import TextRelease, TextVerdict
from services.wire.server import GRPC_OPTIONS
from tests.helpers import LoopThread, SpyTalker
from tests.test_conductor import assert_parity, collect, reference_run
from tests.test_tool_flow import ScriptedThinker

GREEDY = SamplingParams(greedy=True)
REASONING, ANSWER = "\nThe user greets me, so I greet back.\n", "\n\nHello there!"
SCRIPT = f"<think>{REASONING}</think>{ANSWER}"


@pytest.fixture(scope="module")
def thinking(tiny_thinking):
    return Stages.local(Engines.load(tiny_thinking))


@pytest.fixture(scope="module")
def captioner(tiny_captioner):
    return Stages.local(Engines.load(tiny_captioner))


@pytest.fixture(scope="module")
def reference_captioner(tiny_captioner):
    import torch
    from transformers import Qwen3OmniMoeForConditionalGeneration

    return Qwen3OmniMoeForConditionalGeneration.from_pretrained(tiny_captioner, dtype=torch.float32).eval()


# ---- the checkpoints ------------------------------------------------------------------------------------------


def test_tiny_variants_are_checkpoints_without_a_talker(tiny_ckpt, tiny_thinking, tiny_captioner, reference_thinking,
                                                        reference_captioner, thinking, captioner):
    assert detect_variant(Checkpoint.open(tiny_ckpt)).kind == "instruct"
    for path, kind, model, stages in ((tiny_thinking, "thinking", reference_thinking, thinking),
                                      (tiny_captioner, "captioner", reference_captioner, captioner)):
        ckpt = Checkpoint.open(path)
        assert json.loads((path / "config.json").read_text())["enable_audio_output"] is False
        assert {name.split(".")[0] for name in ckpt.weight_map} == {"thinker"}  # no Talker, MTP or Code2Wav tensors
        variant = detect_variant(ckpt)
        assert (variant.kind, variant.speech, variant.output_modalities) == (kind, False, ("text",))
        assert not model.has_talker and not hasattr(model, "talker")  # from_pretrained
        assert stages.processor.tokenizer("Hello world").input_ids == [9707, 1879]  # AutoProcessor (Engines.load)


def test_thinking_template_keeps_reasoning_only_within_the_answer_being_written(thinking):
    processor = thinking.processor
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nan old thought\n</think>\n\nHello!"},
        {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": "", "reasoning_content": "I should look it up."},
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert "old thought" not in text and "<|im_start|>assistant\nHello!<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\nI should look it up.\n</think>\n\n<|im_end|>\n")
    prompt = processor.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("Weather?<|im_end|>\n<|im_start|>assistant\n")  # the model opens <think> itself


def test_a_captioner_is_known_by_its_published_name(tiny_thinking, tmp_path):
    snapshot = tmp_path / "models--Qwen--Qwen3-Omni-30B-A3B-Captioner" / "snapshots" / "abc123"
    shutil.copytree(tiny_thinking, snapshot)
    assert "Qwen3-Omni-30B-A3B-Captioner" in checkpoint_names(snapshot)
    assert detect_variant(Checkpoint.open(snapshot)).kind == "captioner"
    named = tmp_path / "Qwen3-Omni-30B-A3B-Thinking"
    shutil.copytree(tiny_thinking, named)
    (named / "chat_template.jinja").write_text("{{ messages }}")  # the name says it even without the template
    assert detect_variant(Checkpoint.open(named)).kind == "thinking"


def test_audio_output_enabled_without_talker_tensors_is_a_clear_error(tiny_thinking, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_thinking, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "enable_audio_output": True}))
    with pytest.raises(CheckpointError, match="enables audio output but the checkpoint holds no 'talker.*'"):
        detect_variant(Checkpoint.open(broken))


# ---- parity with the reference --------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", ["text", "audio_and_image"])
def test_thinking_equals_the_reference(reference_thinking, thinking, media, inputs):
    assert thinking.talker is None
    given = [audio_part(media["audio"]), image_part(media["image"])] if inputs == "audio_and_image" else []
    req = TurnRequest(parts=[*given, text_part("What is the answer?")], audio_output=False, max_new_tokens=12,
                      thinker_sampling=GREEDY)
    summary = assert_parity(reference_thinking, thinking.processor, collect(Conductor(thinking), req), req)
    assert summary.reasoning == ""  # random weights write no <think>


def test_captioner_equals_the_reference_on_one_audio(reference_captioner, captioner, media):
    req = TurnRequest(parts=[audio_part(media["audio"])], audio_output=False, max_new_tokens=12,
                      thinker_sampling=GREEDY)
    assert_parity(reference_captioner, captioner.processor, collect(Conductor(captioner), req), req)
    prompt = captioner.processor.apply_chat_template([{"role": "user", "content": [{"type": "audio"}]}],
                                                     add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\n<|audio_start|><|audio_pad|><|audio_end|><|im_end|>\n<|im_start|>assistant\n"


def test_generate_command_on_the_thinking_checkpoint(reference_thinking, thinking, tiny_thinking, tmp_path, capsys):
    out = tmp_path / "result.json"
    assert omni(["generate", "--model", str(tiny_thinking), "--text", "Hi!", "--greedy", "--max-new-tokens", "8",
                 "--json", str(out)]) == 0  # no --no-audio needed: the checkpoint answers in text only
    assert "Qwen3-Omni Thinking: text, audio, image, video in; text out" in capsys.readouterr().err
    req = TurnRequest(parts=[text_part("Hi!")], audio_output=False, max_new_tokens=8, thinker_sampling=GREEDY)
    result = json.loads(out.read_text())
    assert result["thinker_token_ids"] == reference_run(reference_thinking, thinking.processor, req)[0]
    assert result["codes"] == [] and result["reasoning"] == ""
    assert omni(["generate", "--model", str(tiny_thinking), "--text", "Hi!", "--output", str(tmp_path / "a.wav")]) == 2
    assert "answers in text only: drop --output" in capsys.readouterr().err


# ---- what a variant refuses -----------------------------------------------------------------------------------


def test_audio_output_from_a_text_only_checkpoint_names_the_variant(thinking):
    with pytest.raises(InvalidInput, match=r"Qwen3-Omni Thinking serves text only \(the checkpoint has no Talker\)"):
        collect(Conductor(thinking), TurnRequest(parts=[text_part("Say it.")], max_new_tokens=2,
                                                 thinker_sampling=GREEDY))


@pytest.mark.parametrize("kinds, extra, found", [
    (["audio", "text"], {}, "text"),
    (["image", "audio"], {}, "images"),
    (["audio", "audio"], {}, "2 audios"),
    ([], {}, "0 audios"),
    (["audio"], dict(history=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
     "earlier turns"),
    (["audio"], dict(system="Be brief."), "a system prompt"),
])
def test_captioner_refuses_requests_outside_its_contract(captioner, media, kinds, extra, found):
    make = {"audio": audio_part(media["audio"]), "image": image_part(media["image"]), "text": text_part("What?")}
    req = TurnRequest(parts=[make[k] for k in kinds], audio_output=False, max_new_tokens=4, thinker_sampling=GREEDY,
                      **extra)
    with pytest.raises(InvalidInput) as e:
        collect(Conductor(captioner), req)
    assert str(e.value) == f"Qwen3-Omni Captioner takes {CAPTIONER_RULES}; this request has {found}"


# ---- reasoning -----------------------------------------------------------------------------------------------


class Recorder(TextFilter):
    """Releases everything; records each call's text and whether it was reasoning."""

    def __init__(self):
        self.calls = []

    async def on_text(self, text, turn):
        self.calls.append(("text", text, turn.reasoning))
        return Release(text)

    async def on_end(self, text, turn):
        self.calls.append(("end", text, turn.reasoning))
        return Release(text)


@pytest.fixture(scope="module")
def instruct(tiny_ckpt):
    return Stages.local(Engines.load(tiny_ckpt))


@pytest.mark.parametrize("filtered", [False, True], ids=["no filters", "filters"])
def test_reasoning_streams_apart_through_the_filters_and_is_never_spoken(instruct, filtered):
    """On the Instruct checkpoint, whose Talker would speak anything released to it."""
    tokenizer = instruct.processor.tokenizer
    talker = SpyTalker(instruct.talker)
    thinker = ScriptedThinker(tokenizer, [SCRIPT], min(instruct.stop_ids))
    recorder = Recorder()
    chain = FilterChain([Link(recorder, "recorder"), Link(Redact(words=["greets"]), "redact")]) if filtered else None
    conductor = Conductor(dataclasses.replace(instruct, thinker=thinker, talker=talker), hooks=chain)
    events = collect(conductor, TurnRequest(parts=[text_part("Hi!")], max_new_tokens=64, max_audio_frames=30,
                                            thinker_sampling=GREEDY))
    summary = events[-1]
    reasoning = REASONING.replace("greets", "[redacted]") if filtered else REASONING
    deltas = [e for e in events if isinstance(e, ReasoningDelta | TextDelta)]
    kinds = [type(e) for e in deltas]
    assert kinds == sorted(kinds, key=lambda k: k is TextDelta)  # all the reasoning, then the answer
    assert "".join(e.text for e in deltas if isinstance(e, ReasoningDelta)) == summary.reasoning == reasoning
    assert "".join(e.text for e in deltas if isinstance(e, TextDelta)) == summary.text == ANSWER
    assert tokenizer.decode(talker.received) == ANSWER and summary.codes  # only the answer is spoken
    assert summary.thinker_token_ids == tokenizer.encode(SCRIPT) + [min(instruct.stop_ids)]
    if filtered:
        assert "".join(t for kind, t, r in recorder.calls if r) == REASONING  # the filters saw it, marked
        assert "".join(t for kind, t, r in recorder.calls if not r) == ANSWER
        assert [(kind, r) for kind, _, r in recorder.calls if kind == "end"] == [("end", True), ("end", False)]


def test_reasoning_over_grpc_hooks_gateway_and_chat_printout(instruct, tmp_path, capsys):
    """The scripted Thinking turn through a hooks stage over gRPC and the Omni API: the reasoning arrives as its
    own deltas and summary field; `omni chat` prints it prefixed."""
    from services.chat_cmd import add_chat_arguments, run_chat
    from tests.api_contract import parse

    tokenizer = instruct.processor.tokenizer
    loop = LoopThread()
    hooks_server, hooks_port = loop.run(serve_stage(HooksServicer(FilterChain([]), instruct.processor),
                                                    host="127.0.0.1"))
    channel = loop.run(_channel(f"127.0.0.1:{hooks_port}"))
    thinker = ScriptedThinker(tokenizer, [SCRIPT] * 3, min(instruct.stop_ids))
    stages = dataclasses.replace(instruct, thinker=thinker)
    servicer = OmniServicer(stages, InProcessSessions(), hooks=RemoteHooks(channel), default_deadline_s=60)
    server, port = loop.run(start_gateway(servicer))
    address = f"127.0.0.1:{port}"
    try:
        async def turn():
            async with OmniClient(address) as client:
                return [e async for e in client.converse(text="Hi!", greedy=True, audio_output=False,
                                                         max_new_tokens=64)]

        events = asyncio.run(turn())
        summary = events[-1]
        assert isinstance(summary, TurnSummary) and (summary.reasoning, summary.text) == (REASONING, ANSWER)
        assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == REASONING
        run_chat(parse(add_chat_arguments, ["--address", address, "--text", "Hi!", "--greedy", "--no-audio",
                                            "--json", str(tmp_path / "chat.json")]))
        assert capsys.readouterr().out == "thinking: The user greets me, so I greet back.\nHello there!\n"
        assert json.loads((tmp_path / "chat.json").read_text())["reasoning"] == REASONING
    finally:
        loop.run(server.stop(None))
        loop.run(channel.close())
        loop.run(hooks_server.stop(None))
        loop.stop()


async def _channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)


class Verdicts(text_filter_pb2_grpc.TextFilterServicer):
    """A remote filter that releases everything and records each piece and whether it was reasoning."""

    def __init__(self):
        self.pieces = []

    async def Filter(self, request_iterator, context):
        async for request in request_iterator:
            kind = request.WhichOneof("kind")
            if kind != "start":
                piece = getattr(request, kind)
                self.pieces.append((kind, piece.text, piece.reasoning))
                yield TextVerdict(release=TextRelease(text=piece.text))


@pytest.mark.parametrize("opened_by_prompt", [False, True], ids=["model opens", "prompt opens"])
async def test_a_remote_filter_is_told_which_pieces_are_reasoning(instruct, opened_by_prompt):
    tokenizer = instruct.processor.tokenizer
    verdicts = Verdicts()
    server = grpc.aio.server()
    text_filter_pb2_grpc.add_TextFilterServicer_to_server(verdicts, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        tags = ReasoningTags(*tokenizer.convert_tokens_to_ids(["<think>", "</think>"]), opened_by_prompt)
        chain = FilterChain([Link(RemoteFilter(f"127.0.0.1:{port}", deadline_s=5.0), "remote")])
        session = chain.session(HookContext(), tokenizer, reasoning=tags)
        script = SCRIPT.removeprefix("<think>") if opened_by_prompt else SCRIPT
        released = [await session.feed(i) for i in tokenizer.encode(script)] + [await session.finish()]
    finally:
        await server.stop(0)
    assert "".join(r.reasoning for r in released) == REASONING and "".join(r.text for r in released) == ANSWER
    assert "".join(t for kind, t, r in verdicts.pieces if r) == REASONING
    assert "".join(t for kind, t, r in verdicts.pieces if not r) == ANSWER
    assert [(kind, r) for kind, _, r in verdicts.pieces if kind == "end"] == [("end", True), ("end", False)]


def test_reasoning_tags_see_a_template_that_opens_the_block(instruct):
    import jinja2

    tokenizer = instruct.processor.tokenizer
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}<|im_start|>assistant\n<think>\n"

    def render(messages, **kwargs):
        return jinja2.Template(template).render(messages=messages)

    opened = reasoning_tags(SimpleNamespace(tokenizer=tokenizer, chat_template=template, apply_chat_template=render))
    assert opened == ReasoningTags(151667, 151668, opened_by_prompt=True)
    assert reasoning_tags(instruct.processor) == ReasoningTags(151667, 151668, opened_by_prompt=False)


def test_text_printer_dims_reasoning_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    printer = TextPrinter(out)
    for piece in ("\n", "Hmm", ".\n"):
        printer.reasoning(piece)
    printer.text("\n\nYes.")
    printer.end()
    assert out.getvalue() == f"{TextPrinter.DIM}Hmm.\n{TextPrinter.RESET}Yes.\n"


# ---- over gRPC: what the deployment says it serves ----------------------------------------------------------


@pytest.fixture(scope="module")
def gateways(thinking, captioner):
    """In-process gateways (real gRPC on loopback) over the Thinking and Captioner stages."""
    loop = LoopThread()
    addresses = {}
    servers = []
    for name, stages in (("thinking", thinking), ("captioner", captioner)):
        server, port = loop.run(start_gateway(OmniServicer(stages, InProcessSessions(), default_deadline_s=60)))
        servers.append(server)
        addresses[name] = f"127.0.0.1:{port}"
    yield addresses
    for server in servers:
        loop.run(server.stop(None))
    loop.stop()


def _describe(address: str):
    async def go():
        async with OmniClient(address) as client:
            return await client.describe()

    return asyncio.run(go())


def test_describe_says_what_each_deployment_serves(gateways):
    thinking = _describe(gateways["thinking"])
    assert (thinking.variant, thinking.model, thinking.output_modalities) == ("thinking", "Qwen3-Omni Thinking",
                                                                            ("text",))
    assert thinking.input_modalities == ("text", "audio", "image", "video") and thinking.reasoning
    assert thinking.speakers == () and thinking.input_rules == ""
    captioner = _describe(gateways["captioner"])
    assert (captioner.variant, captioner.input_modalities, captioner.output_modalities) == ("captioner", ("audio",),
                                                                                          ("text",))
    assert captioner.input_rules == CAPTIONER_RULES and not captioner.reasoning


def test_statuses_name_the_variant_and_unset_modalities_mean_text(gateways, media, captioner, reference_captioner):
    with pytest.raises(ConverseError) as e:
        OmniClient(gateways["thinking"]).converse_sync(text="Speak!", greedy=True, max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "Qwen3-Omni Thinking serves text only" in e.value.details
    with pytest.raises(ConverseError) as e:
        OmniClient(gateways["captioner"]).converse_sync(text="Describe it.", audios=[media["audio"]], greedy=True,
                                                        audio_output=False, max_new_tokens=2)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith("Qwen3-Omni Captioner takes one audio and nothing else")
    # A config without output modalities gets what the deployment serves: the caption, as text.
    from services.wire.gen.omni.v1 import common_pb2, omni_pb2, omni_pb2_grpc

    async def raw_turn():
        with open(media["audio"], "rb") as f:
            audio = f.read()
        async with grpc.aio.insecure_channel(gateways["captioner"]) as channel:
            config = omni_pb2.ConverseConfig(max_new_tokens=6, thinker_sampling=common_pb2.SamplingParams(greedy=True))
            call = omni_pb2_grpc.OmniStub(channel).Converse()
            await call.write(omni_pb2.ConverseRequest(config=config))
            assert (await call.read()).WhichOneof("kind") == "started"
            await call.write(omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(encoded=audio)))
            await call.write(omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn()))
            await call.done_writing()
            messages = []
            while (msg := await call.read()) is not grpc.aio.EOF:
                messages.append(msg)
            return messages

    messages = asyncio.run(raw_turn())
    summary = messages[-1].summary
    req = TurnRequest(parts=[audio_part(media["audio"])], audio_output=False, max_new_tokens=6, thinker_sampling=GREEDY)
    assert list(summary.thinker_token_ids) == reference_run(reference_captioner, captioner.processor, req)[0]
    assert summary.speaker == "" and not any(m.WhichOneof("kind") == "audio" for m in messages)
