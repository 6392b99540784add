"""`omni chat`: one turn against a running server (`omni serve`) over the Omni gRPC API; prints text as it streams,
writes the spoken answer as a WAV and the same result JSON as `omni generate`.

Failures print one line with the gRPC status name (e.g. `omni: error: INVALID_ARGUMENT: unknown speaker 'bob'`) and
exit non-zero: `ConverseError` is an `OmniError`, which the CLI reports that way.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np

from services.client import OmniClient, Video
from services.errors import InvalidInput
from services.events import TurnSummary
from services.generate import TextPrinter, add_turn_arguments, parts_from_args, write_outputs


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, metavar="HOST:PORT", help="the server's gRPC address")
    p.add_argument("--session", default="", metavar="ID",
                   help="conversation id: the server keeps earlier turns of the same id as history")
    add_turn_arguments(p)
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS", help="give up after this long")
    p.add_argument("--api-key-file", metavar="FILE", help="file holding the API key (default: $OMNI_API_KEY, else "
                                                          "the key a local `omni serve` wrote, ~/.config/omni/api-key)")


def _video_from_dir(path: str, fps: float) -> Video:
    frames = sorted(p for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else []
    if not frames:
        raise InvalidInput(f"--video {path}: not a directory of frame images")
    return Video(frames=frames, timestamps=[i / fps for i in range(len(frames))])


def _api_key(path: str | None) -> str | None:
    if path is None:
        return None  # the client's default
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise InvalidInput(f"--api-key-file {path}: {e.strerror}") from None


async def _chat(args: argparse.Namespace) -> tuple[TurnSummary, np.ndarray]:
    printer = TextPrinter(sys.stdout)
    async with OmniClient(args.address, api_key=_api_key(args.api_key_file)) as client:
        result = await client.collect(
            on_text=printer.text, on_reasoning=printer.reasoning, parts=parts_from_args(args, _video_from_dir),
            speaker=args.speaker, session_id=args.session, system_prompt=args.system,
            audio_output=not args.no_audio, greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, max_new_tokens=args.max_new_tokens,
            max_audio_frames=args.max_audio_frames, deadline_s=args.deadline,
        )
    printer.end()
    return result


def run_chat(args: argparse.Namespace) -> None:
    if not args.no_audio and not args.output:
        raise InvalidInput("--output WAV is required unless --no-audio is given")
    summary, samples = asyncio.run(_chat(args))
    write_outputs(summary, samples, None if args.no_audio else args.output, args.json)
