"""`omni generate`: one turn through the in-process streaming conductor; prints text as it streams, writes a WAV.

The checkpoint decides what the turn can be (`services.checkpoint.variant`): a checkpoint without a Talker answers
in text only, and a Thinking model's reasoning is printed apart from its answer (`TextPrinter`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np

from services.engines.sampling import SamplingParams
from services.errors import InvalidInput
from services.events import AudioChunk, ReasoningDelta, TextDelta, TurnSummary


class _Part(argparse.Action):
    """Appends (kind, value) to `parts`: the turn's parts in their order on the command line."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.parts = [*(getattr(namespace, "parts", None) or []), (self.const, value)]


def add_turn_arguments(p: argparse.ArgumentParser) -> None:
    """The options of one turn, shared by `omni generate` (in process) and `omni chat` (over gRPC). The turn's
    parts are --text, --audio, --image and --video in the order given (`--image a.png --text "and" --image b.png`)."""
    p.set_defaults(parts=[])
    p.add_argument("--text", action=_Part, const="text", metavar="TEXT",
                   help="a text part of this turn (repeatable; parts keep their command-line order)")
    p.add_argument("--audio", action=_Part, const="audio", metavar="WAV", help="an audio part (any rate; repeatable)")
    p.add_argument("--image", action=_Part, const="image", metavar="IMG", help="an image part (repeatable)")
    p.add_argument("--video", action=_Part, const="video", metavar="DIR",
                   help="a video part: a directory of frame images whose names sort in time order (repeatable)")
    p.add_argument("--video-fps", type=float, default=2.0, help="frame rate of --video frames (timestamps = i/fps)")
    p.add_argument("--system", help="the Thinker's system prompt")
    p.add_argument("--speaker", default="ethan", help="voice, one of the checkpoint's talker_config.speaker_id names")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="cap on the Thinker's answer length")
    p.add_argument("--max-audio-frames", type=int, default=4096, help="cap on the Talker's frames (12.5 per second)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding in the Thinker, Talker and MTP")
    p.add_argument("--temperature", type=float, default=0.7, help="Thinker sampling temperature")
    p.add_argument("--top-p", type=float, default=0.8, help="Thinker nucleus sampling")
    p.add_argument("--top-k", type=int, default=20, help="Thinker top-k sampling (0: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--no-audio", action="store_true", help="text only: no Talker, MTP or Code2Wav (what a checkpoint "
                                                           "without a Talker always answers)")
    p.add_argument("--output", metavar="WAV", help="where to write the spoken answer (PCM16, 24 kHz)")
    p.add_argument("--json", metavar="FILE", help="write text, token ids, codes, timings as JSON")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (e.g. one written by `omni checkpoint tiny`)")
    p.add_argument("--conversation", metavar="FILE",
                   help="earlier turns as chat-message JSON (a list of {role, content}); if it ends with a user "
                        "message and no other input is given, that message is the turn, its parts in order")
    add_turn_arguments(p)
    p.add_argument("--device", default="cpu", help="torch device for every stage")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def _load_conversation(path: str) -> list[dict]:
    from services.preprocess import validate_conversation

    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidInput(f"conversation file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"conversation file {path} is not valid JSON: {e}") from None
    if isinstance(raw, dict) and "messages" in raw:
        raw = raw["messages"]
    return validate_conversation(raw)


def _split_last_user_turn(history: list[dict]) -> tuple[list[dict], list[dict]]:
    """A conversation ending with a user message: that message's parts, in order, are this turn."""
    from services.turn_parts import text_part

    last = history[-1]
    return history[:-1], [text_part(last["content"])] if isinstance(last["content"], str) else list(last["content"])


def parts_from_args(args: argparse.Namespace, video) -> list[dict]:
    """The command line's parts in order; `video(dir, fps)` makes a video part's value."""
    from services.turn_parts import audio_part, image_part, text_part, video_part

    make = {"text": text_part, "audio": audio_part, "image": image_part,
            "video": lambda d: video_part(video(d, args.video_fps))}
    return [make[kind](value) for kind, value in args.parts]


def _video_from_dir(path: str, fps: float):
    from services.preprocess import load_video

    frames = sorted(p for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else []
    if not frames:
        raise InvalidInput(f"--video {path}: not a directory of frame images")
    return load_video([str(f) for f in frames], [i / fps for i in range(len(frames))])


def build_request(args: argparse.Namespace):
    from services.conductor import TurnRequest

    if not args.no_audio and not args.output:
        raise InvalidInput("--output WAV is required unless --no-audio is given")
    history: list[dict] = _load_conversation(args.conversation) if args.conversation else []
    parts = parts_from_args(args, _video_from_dir)
    if history and history[-1]["role"] == "user" and not parts:
        history, parts = _split_last_user_turn(history)
    greedy = args.greedy
    thinker_sampling = SamplingParams(greedy=True) if greedy else SamplingParams(
        greedy=False, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    return TurnRequest(
        parts=parts, history=history, system=args.system,
        speaker=args.speaker, audio_output=not args.no_audio, max_new_tokens=args.max_new_tokens,
        max_audio_frames=args.max_audio_frames, thinker_sampling=thinker_sampling,
    )


class TextPrinter:
    """A turn's text as it streams: reasoning first, dimmed on a terminal and otherwise each of its lines prefixed
    with "thinking: ", then the answer on a line of its own (the blank lines around the reasoning left out)."""

    PREFIX, DIM, RESET = "thinking: ", "\x1b[2m", "\x1b[0m"

    def __init__(self, out=None):
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.block: str | None = None  # what is being printed: "reasoning" or "answer"
        self.fresh = True  # nothing of the block printed yet
        self.line_start = True
        self.after_reasoning = False

    def reasoning(self, text: str) -> None:
        if self.block != "reasoning":
            self._switch("reasoning")
        for i, line in enumerate(text.split("\n")):
            if i and not self.fresh:
                self._write("\n")
                self.line_start = True
            if line:
                self._write((self.PREFIX if self.line_start and not self.tty else "") + line)
                self.line_start = self.fresh = False

    def text(self, text: str) -> None:
        if self.block != "answer":
            self._switch("answer")
        if self.fresh and self.after_reasoning:
            text = text.lstrip("\n")
        if text:
            self._write(text)
            self.fresh = False

    def end(self) -> None:
        if self.block == "reasoning":
            self._switch(None)
        else:
            self._write("\n")

    def _switch(self, block: str | None) -> None:
        self.after_reasoning = self.block == "reasoning"
        if self.after_reasoning:
            self._write((self.RESET if self.tty else "") + ("" if self.line_start else "\n"))
        if block == "reasoning" and self.tty:
            self._write(self.DIM)
        self.block, self.fresh, self.line_start = block, True, True

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


async def _stream(conductor, request, out=None) -> tuple[TurnSummary, np.ndarray]:
    printer = TextPrinter(out)
    chunks: list[np.ndarray] = []
    summary = None
    async for event in conductor.run(request):
        if isinstance(event, TextDelta):
            printer.text(event.text)
        elif isinstance(event, ReasoningDelta):
            printer.reasoning(event.text)
        elif isinstance(event, AudioChunk):
            chunks.append(event.samples)
        elif isinstance(event, TurnSummary):
            summary = event
    printer.end()
    return summary, (np.concatenate(chunks) if chunks else np.zeros(0, np.float32))


def result_json(summary: TurnSummary) -> dict:
    return {
        "text": summary.text,
        "reasoning": summary.reasoning,
        "thinker_token_ids": summary.thinker_token_ids,
        "codes": summary.codes,
        "sample_rate": summary.sample_rate,
        "num_samples": summary.num_samples,
        "speaker": summary.speaker,
        "finish_reason": summary.finish_reason,
        "timings": summary.timings,
    }


def write_outputs(summary: TurnSummary, samples: np.ndarray, wav: str | None, json_path: str | None) -> None:
    """Write the WAV and the JSON result (either may be None), then a one-line report on stderr."""
    import soundfile as sf

    from services.events import float_to_pcm16

    if wav:
        Path(wav).parent.mkdir(parents=True, exist_ok=True)
        sf.write(wav, float_to_pcm16(samples), summary.sample_rate, subtype="PCM_16")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result_json(summary)))
    t = summary.timings
    print(
        f"[{len(summary.thinker_token_ids)} tokens, {len(summary.codes)} frames, {summary.num_samples} samples "
        f"({t.get('audio_s', 0):.2f} s); first text {t.get('time_to_first_text_s', 0) * 1000:.0f} ms, "
        f"first audio {t.get('time_to_first_audio_s', 0) * 1000:.0f} ms, total {t.get('total_s', 0):.2f} s]",
        file=sys.stderr,
    )
    if wav:
        print(f"wrote {wav}", file=sys.stderr)


def run_generate(args: argparse.Namespace) -> None:
    from services.checkpoint.loading import Checkpoint
    from services.checkpoint.variant import detect_variant
    from services.conductor import Conductor
    from services.config import EngineConfig
    from services.engines.bundle import Engines
    from services.stages import Stages

    variant = detect_variant(Checkpoint.open(args.model))
    print(f"omni generate: {variant.describe()}", file=sys.stderr)
    if not variant.speech:
        if args.output:
            raise InvalidInput(f"{variant.title} answers in text only: drop --output")
        args.no_audio = True
    request = build_request(args)
    engines = Engines.load(args.model, EngineConfig(device=args.device, dtype=args.dtype),
                           audio_output=request.audio_output)
    summary, samples = asyncio.run(_stream(Conductor(Stages.local(engines)), request))
    write_outputs(summary, samples, args.output if request.audio_output else None, args.json)
