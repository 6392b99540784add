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
from services.generate import write_outputs


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", required=True, metavar="HOST:PORT", help="the server's gRPC address")
    p.add_argument("--session", default="", metavar="ID",
                   help="conversation id: the server keeps earlier turns of the same id as history")
    p.add_argument("--text", help="the user's text for this turn")
    p.add_argument("--audio", action="append", default=[], metavar="WAV", help="audio input (any rate; repeatable)")
    p.add_argument("--image", action="append", default=[], metavar="IMG", help="image input (repeatable)")
    p.add_argument("--video", action="append", default=[], metavar="DIR",
                   help="video input: a directory of frame images whose names sort in time order (repeatable)")
    p.add_argument("--video-fps", type=float, default=2.0, help="frame rate of --video frames (timestamps = i/fps)")
    p.add_argument("--system", help="the Thinker's system prompt (default: the session's, if any)")
    p.add_argument("--speaker", default="ethan", help="voice, one of the checkpoint's talker_config.speaker_id names")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="cap on the Thinker's answer length")
    p.add_argument("--max-audio-frames", type=int, default=4096, help="cap on the Talker's frames (12.5 per second)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding in the Thinker, Talker and MTP")
    p.add_argument("--temperature", type=float, default=0.7, help="Thinker sampling temperature")
    p.add_argument("--top-p", type=float, default=0.8, help="Thinker nucleus sampling")
    p.add_argument("--top-k", type=int, default=20, help="Thinker top-k sampling (0: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--no-audio", action="store_true", help="text only: no spoken answer")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS", help="give up after this long")
    p.add_argument("--output", metavar="WAV", help="where to write the spoken answer (PCM16, 24 kHz)")
    p.add_argument("--json", metavar="FILE", help="write text, token ids, codes, timings as JSON")


def _video_from_dir(path: str, fps: float) -> Video:
    frames = sorted(p for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else []
    if not frames:
        raise InvalidInput(f"--video {path}: not a directory of frame images")
    return Video(frames=frames, timestamps=[i / fps for i in range(len(frames))])


def _print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def _chat(args: argparse.Namespace) -> tuple[TurnSummary, np.ndarray]:
    async with OmniClient(args.address) as client:
        result = await client.collect(
            on_text=_print_now, text=args.text, audios=args.audio, images=args.image,
            videos=[_video_from_dir(v, args.video_fps) for v in args.video],
            speaker=args.speaker, session_id=args.session, system_prompt=args.system,
            audio_output=not args.no_audio, greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, max_new_tokens=args.max_new_tokens,
            max_audio_frames=args.max_audio_frames, deadline_s=args.deadline,
        )
    sys.stdout.write("\n")
    return result


def run_chat(args: argparse.Namespace) -> None:
    if not args.no_audio and not args.output:
        raise InvalidInput("--output WAV is required unless --no-audio is given")
    summary, samples = asyncio.run(_chat(args))
    write_outputs(summary, samples, None if args.no_audio else args.output, args.json)
    t = summary.timings
    print(
        f"[{len(summary.thinker_token_ids)} tokens, {len(summary.codes)} frames, {summary.num_samples} samples "
        f"({t.get('audio_s', 0):.2f} s); first text {t.get('time_to_first_text_s', 0) * 1000:.0f} ms, "
        f"first audio {t.get('time_to_first_audio_s', 0) * 1000:.0f} ms, total {t.get('total_s', 0):.2f} s]",
        file=sys.stderr,
    )
    if not args.no_audio:
        print(f"wrote {args.output}", file=sys.stderr)
