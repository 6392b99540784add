"""`omni bench input`: the wait from `end_of_turn` to the first audio packet, live prefill against the whole turn.

    omni bench input                                  # in process: the tiny checkpoint, then a real-width slice
    omni bench input --address 127.0.0.1:9000 --metrics-port 8080   # a deployment (omni serve), at the client

Audio: real speech (`espeak-ng` reads a text, repeated to length) streamed as PCM in `--chunk-ms` chunks, at real
time and as fast as the client sends, then `end_of_turn`; for each of `--seconds`; every turn's audio starts at
another point of the text, so no cache holds it from an earlier turn, as none would a user's new audio. Text: a
`--turns`-turn conversation in a session (the replica keeps its KV) against a 1-turn one, and against the same
history sent without a session (prefilled whole). Each row is the median of `--repeats` turns (the session row's
each in a new session), taken in turn with the other rows of its group, both paths' (so that drift weighs on each
alike: a group prints when its last turn is done), timed at the client over gRPC; "live" is the gateway prefilling
while the input streams in (`services.live_input`), "whole" the same gateway with it off (in process, a gateway
started so; a deployment's, turns that ask for it: `ConverseConfig.defer_prefill`). Columns: end of turn to first
audio (ms), the ratio to its path's first row in its group, the slowest of its turns (a redo at a turn's end shows
there), then per turn the live prefills, those of them that caught up with a louder moment in an audio's partial
window (all of it so far), the prefills redone from a changed window (the log-mel clamp), the prompt positions the
Thinker reused and prefilled, the Talker's (t.), and where the median turn's time went (ms, from its summary:
preprocessing the whole turn, the Thinker's first token after its prompt was ready, the Talker's first frame after
its first text). Goals (issue 9): 120 s within 1.2x of 2 s; 20 turns within 1.2x of 1 turn.

The slice has the real Thinker and audio-encoder widths (2 layers, 8 experts, top 8) and random weights: prefill
costs what it costs per layer in the real model, which the tiny checkpoint does not show.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from services.bench.latency import DEFAULT_REAL_CONFIG
from services.bench.load import ray_sum

SPEECH = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wound the clock, and "
          "wrote in his log what ships had passed and how the wind had turned. On stormy nights he stayed awake "
          "until the morning, listening to the waves against the rocks below.")
COUNTERS = {"prefills": ("omni_live_prefills_total", {}), "catch-ups": ("omni_live_catch_ups_total", {}),
            "redos": ("omni_thinker_prefix_redos_total", {}),
            "reused": ("omni_stage_prompt_tokens_total", {"stage": "thinker", "kind": "reused"}),
            "prefilled": ("omni_stage_prompt_tokens_total", {"stage": "thinker", "kind": "prefilled"}),
            "t.reused": ("omni_stage_prompt_tokens_total", {"stage": "talker", "kind": "reused"}),
            "t.prefilled": ("omni_stage_prompt_tokens_total", {"stage": "talker", "kind": "prefilled"})}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="omni bench input", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", default="2,30,120", help="comma-separated lengths of streamed audio")
    p.add_argument("--pace", choices=("realtime", "fast", "both"), default="both",
                   help="send the audio at real time, as fast as possible, or both")
    p.add_argument("--chunk-ms", type=int, default=100, help="audio chunk length")
    p.add_argument("--turns", type=int, default=20, help="turns of the long text conversation")
    p.add_argument("--tokens", type=int, default=8, help="Thinker tokens per answer (greedy)")
    p.add_argument("--repeats", type=int, default=1,
                   help="turns timed per row, the median printed (a single turn on a busy machine is noisy)")
    p.add_argument("--address", help="a deployment's gRPC address (omni serve); default: in process")
    p.add_argument("--metrics-port", type=int, help="with --address: Ray's Prometheus port, for the counters")
    p.add_argument("--real-config", type=Path, default=DEFAULT_REAL_CONFIG,
                   help="the real model's config.json, for the slice's widths")
    p.add_argument("--skip-slice", action="store_true", help="in process: only the tiny checkpoint")
    args = p.parse_args(argv)
    try:
        args.seconds = [float(s) for s in args.seconds.split(",")]
    except ValueError:
        p.error(f"--seconds takes numbers like 2,30,120, got {args.seconds!r}")
    if min(args.seconds) <= 0 or args.chunk_ms < 1 or args.turns < 2 or args.tokens < 1 or args.repeats < 1:
        p.error("--seconds and --chunk-ms must be positive, --turns >= 2, --tokens and --repeats >= 1")
    return args


def speech(seconds: float, tmp: Path, start_s: float = 0.0) -> tuple[np.ndarray, int]:
    """`seconds` of espeak-ng speech (PCM16) from `start_s` into it, the text read again as often as needed."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("omni bench input needs espeak-ng for real speech: apt-get install espeak-ng")
    wav = tmp / "speech.wav"
    if not wav.exists():
        subprocess.run(["espeak-ng", "-w", str(wav), SPEECH], check=True)
    import soundfile as sf

    pcm, rate = sf.read(wav, dtype="int16")
    first = int(start_s * rate) % len(pcm)
    return np.tile(pcm, int(np.ceil((seconds * rate + first) / len(pcm))))[first:first + int(seconds * rate)], rate


def new_speech(args, seconds: float, tmp: Path, turns: Iterator[int]) -> Callable:
    """Each call: an audio turn of `seconds` of speech that no turn before had (the `turns`' next start into the
    text), so that no cache of the gateway's (decoded samples, log-mel frames, digests) holds it from another row or
    repeat, as none would hold a user's new audio."""

    async def turn() -> list:
        return audio_turn(args, *speech(seconds, tmp, start_s=0.37 * next(turns)))
    return turn


class Target:
    """A gateway to time turns against, and the counters that say what it did."""

    def __init__(self, address: str, counters, metadata=(), lag_s: float = 0.0, defer_prefill: bool = False):
        """`lag_s`: how long the counters take to show a turn (Ray exports a deployment's every few seconds);
        `defer_prefill`: each turn asks the gateway to prefill nothing before its end (the whole-turn path)."""
        self.address, self.counters, self.metadata, self.lag_s = address, counters, metadata, lag_s
        self.defer_prefill = defer_prefill

    async def turn(self, requests: list, pace_s: float = 0.0) -> tuple[float, object]:
        """Send `requests` (config ... end_of_turn), `pace_s` apart for audio: (end of turn to first audio s,
        the summary)."""
        import grpc

        from services.wire.gen.omni.v1 import omni_pb2_grpc

        sent = {}
        if self.defer_prefill:
            requests = [copy.deepcopy(requests[0]), *requests[1:]]
            requests[0].config.defer_prefill = True

        async def send():
            for msg in requests:
                if msg.WhichOneof("kind") == "end_of_turn":
                    sent["end"] = time.perf_counter()
                yield msg
                if pace_s and msg.WhichOneof("kind") == "audio":
                    await asyncio.sleep(pace_s)

        first = summary = None
        async with grpc.aio.insecure_channel(self.address) as channel:
            async for msg in omni_pb2_grpc.OmniStub(channel).Converse(send(), metadata=self.metadata):
                kind = msg.WhichOneof("kind")
                if kind == "audio" and first is None:
                    first = time.perf_counter()
                elif kind == "summary":
                    summary = msg.summary
        return first - sent["end"], summary


def _config(args, **fields):
    from services.wire.gen.omni.v1 import common_pb2, omni_pb2

    return omni_pb2.ConverseRequest(config=omni_pb2.ConverseConfig(
        max_new_tokens=args.tokens, max_audio_frames=20, thinker_sampling=common_pb2.SamplingParams(greedy=True),
        **fields))


def audio_turn(args, pcm: np.ndarray, rate: int) -> list:
    from services.wire.gen.omni.v1 import omni_pb2

    step = max(1, rate * args.chunk_ms // 1000)
    return [_config(args), omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text="Listen to this: ")),
            *(omni_pb2.ConverseRequest(audio=omni_pb2.AudioInput(audio_id="a", sample_rate=rate,
                                                                 pcm16=pcm[i:i + step].tobytes()))
              for i in range(0, len(pcm), step)),
            omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text=" What did you hear?")),
            omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn())]


def text_turn(args, text: str, **config) -> list:
    from services.wire.gen.omni.v1 import omni_pb2

    return [_config(args, **config), omni_pb2.ConverseRequest(text=omni_pb2.TextInput(text=text)),
            omni_pb2.ConverseRequest(end_of_turn=omni_pb2.EndOfTurn())]


HEADER = f"{'where':<6} {'path':<6} {'input':<22} {'eot->audio':>10} {'ratio':>6} {'worst':>7} {'prefills':>8} " \
         f"{'catch':>5} {'redos':>5} {'reused':>7} {'prefilled':>9} {'t.reused':>8} {'t.prefilled':>11} {'prep':>6} " \
         f"{'thinker':>7} {'talker':>6}"


async def group(where: str, rows: list[tuple[str, Target, str, Callable, float]], repeats: int) -> None:
    """Time `repeats` turns of each row (path, target, what, `await turn()` for one turn's requests after any set-up
    turns of its own, the audio's pace), one of each row in turn, so that the machine's drift over a run weighs on
    every row alike; then print each row: the median turn's wait and stage times, the counters per turn, the ratio
    to its path's first row."""
    timed = [[] for _ in rows]
    delta = [dict.fromkeys(COUNTERS, 0.0) for _ in rows]
    for _ in range(repeats):
        for i, (_, target, _, turn, pace_s) in enumerate(rows):
            requests = await turn()
            before = target.counters()
            timed[i].append(await target.turn(requests, pace_s))
            await asyncio.sleep(target.lag_s)
            after = target.counters()
            for k in COUNTERS:
                delta[i][k] += (after.get(k, 0.0) - before.get(k, 0.0)) / repeats
    base: dict[str, float] = {}
    for i, (path, _, what, _, _) in enumerate(rows):
        wait, summary = sorted(timed[i], key=lambda t: t[0])[(repeats - 1) // 2]
        base.setdefault(path, wait)
        stages = " ".join(f"{summary.timings.get(key, float('nan')) * 1e3:>{width}.0f}"
                          for key, width in (("preprocess_s", 6), ("thinker_ttft_s", 7), ("talker_ttft_s", 6)))
        d = delta[i]
        worst = max(t[0] for t in timed[i])
        print(f"{where:<6} {path:<6} {what:<22} {wait * 1e3:>8.0f}ms {wait / base[path]:>6.2f} {worst * 1e3:>5.0f}ms "
              f"{d['prefills']:>8.0f} {d['catch-ups']:>5.0f} {d['redos']:>5.0f} {d['reused']:>7.0f} "
              f"{d['prefilled']:>9.0f} {d['t.reused']:>8.0f} {d['t.prefilled']:>11.0f} {stages}", flush=True)


def _given(requests: list):
    async def turn() -> list:
        return requests
    return turn


async def bench(where: str, targets: dict[str, Target], args, tmp: Path) -> None:
    first = next(iter(targets.values()))
    await first.turn(text_turn(args, "Hello."))  # warm-up: text, then audio (the first row is not a cold one)
    await first.turn(audio_turn(args, *speech(2.0, tmp)))
    paces = {"realtime": ["realtime"], "fast": ["fast"], "both": ["realtime", "fast"]}[args.pace]
    turns = itertools.count(1)  # 0: the warm-up's
    for pace in paces:
        pace_s = args.chunk_ms / 1000 if pace == "realtime" else 0.0
        await group(where, [(path, target, f"audio {seconds:g} s {pace}", new_speech(args, seconds, tmp, turns),
                             pace_s) for path, target in targets.items() for seconds in args.seconds], args.repeats)
    await group(where, [row for path, target in targets.items()
                        for row in _text_rows(args, path, target)], args.repeats)


def _text_rows(args, path: str, target: Target) -> list[tuple[str, Target, str, Callable, float]]:
    """A 1-turn conversation; `args.turns` turns in a session; the same history sent without one."""
    from services.wire.gen.omni.v1 import omni_pb2

    histories = []

    async def in_session() -> list:  # a new session each time: the conversation so far, then the timed turn
        session, history = f"bench-{time.monotonic_ns()}", []
        for k in range(args.turns - 1):
            _, summary = await target.turn(text_turn(args, f"Question {k}: tell me about the sea.",
                                                     session_id=session))
            history += [("user", f"Question {k}: tell me about the sea."), ("assistant", summary.text)]
        histories.append(history)
        return text_turn(args, "Tell me about the sea.", session_id=session)

    async def no_session() -> list:  # the same history sent with the turn, prefilled whole
        history = [omni_pb2.ChatMessage(role=r, text=t) for r, t in histories[0]]
        return text_turn(args, "Tell me about the sea.", history=history)

    return [(path, target, "text, 1 turn", _given(text_turn(args, "Tell me about the sea.")), 0.0),
            (path, target, f"text, {args.turns} turns", in_session, 0.0),
            (path, target, f"text, {args.turns} no sess.", no_session, 0.0)]


def slice_config(real_config_path: Path):
    """The tiny config with the real Thinker and audio encoder widths: 2 layers, 8 experts (top 8, as many active
    as the real model), random weights; the Talker and the rest stay tiny."""
    from transformers import Qwen3OmniMoeConfig

    from services.checkpoint.tiny import TINY_CONFIG

    real = json.loads(real_config_path.read_text())
    cfg = copy.deepcopy(TINY_CONFIG)
    text = copy.deepcopy(real["thinker_config"]["text_config"])
    text.update(num_hidden_layers=2, num_experts=8, num_experts_per_tok=8)
    cfg["thinker_config"]["text_config"] = text
    audio = copy.deepcopy(real["thinker_config"]["audio_config"])
    audio.update(encoder_layers=2)
    cfg["thinker_config"]["audio_config"] = audio
    cfg["thinker_config"]["vision_config"]["out_hidden_size"] = text["hidden_size"]
    cfg["talker_config"].update(thinker_hidden_size=text["hidden_size"], accept_hidden_layer=1)
    return Qwen3OmniMoeConfig(**cfg)


def counters_in_process() -> dict[str, float]:
    from prometheus_client import REGISTRY

    return {k: REGISTRY.get_sample_value(name, labels) or 0.0 for k, (name, labels) in COUNTERS.items()}


def counters_of(metrics_port: int | None):
    def read() -> dict[str, float]:
        if metrics_port is None:
            return {}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {k: ray_sum(text, name, labels) for k, (name, labels) in COUNTERS.items()}

    return read


async def in_process(where: str, model_dir: Path, args, tmp: Path) -> None:
    from services.engines.bundle import Engines
    from services.gateway import OmniServicer, start_gateway
    from services.sessions import InProcessSessions
    from services.stages import Stages

    stages = Stages.local(Engines.load(model_dir))
    servers, targets = [], {}
    for path, live in (("live", True), ("whole", False)):
        server, port = await start_gateway(OmniServicer(stages, InProcessSessions(), live_prefill=live))
        servers.append(server)
        targets[path] = Target(f"127.0.0.1:{port}", counters_in_process)
    try:
        await bench(where, targets, args, tmp)
    finally:
        for server in servers:
            await server.stop(None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import transformers

    from services.workers import threads_summary

    transformers.logging.set_verbosity_error()
    print(f"omni bench input: audio {args.seconds} s in {args.chunk_ms} ms chunks ({args.pace}), text {args.turns} "
          f"turns; {args.tokens} tokens per answer, greedy; {threads_summary()}")
    print(HEADER)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.address:
            from services.client import OmniClient

            targets = {path: Target(args.address, counters_of(args.metrics_port), OmniClient("").metadata,
                                    lag_s=6.0 if args.metrics_port else 0.0, defer_prefill=path == "whole")
                       for path in ("live", "whole")}
            asyncio.run(bench("served", targets, args, tmp))
            return
        from services.checkpoint.tiny import tiny_config, write_random_checkpoint

        asyncio.run(in_process("tiny", write_random_checkpoint(tmp / "tiny", tiny_config()), args, tmp))
        if args.skip_slice:
            return
        if not args.real_config.is_file():
            print(f"slice: skipped, {args.real_config} not found (pass --real-config)")
            return
        print("writing the real-width slice checkpoint...", flush=True)
        model = write_random_checkpoint(tmp / "slice", slice_config(args.real_config))
        asyncio.run(in_process("slice", model, args, tmp))


if __name__ == "__main__":
    main()
