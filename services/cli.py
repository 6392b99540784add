"""The `omni` command. Each subcommand's work lives in its own module; this file only parses and dispatches.

Errors the user can fix (bad checkpoint, bad input, unknown speaker) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from services.errors import OmniError


def _checkpoint_tiny(args: argparse.Namespace) -> None:
    from services.checkpoint.tiny import write_tiny_checkpoint

    out = write_tiny_checkpoint(args.dir, seed=args.seed, max_shard_size=args.max_shard_size, variant=args.variant)
    print(f"wrote tiny Qwen3-Omni {args.variant.capitalize()} checkpoint to {out}")


def _generate(args: argparse.Namespace) -> None:
    from services.generate import run_generate

    run_generate(args)


def _chat(args: argparse.Namespace) -> None:
    from services.chat_cmd import run_chat

    run_chat(args)


def _cluster_tls(args: argparse.Namespace) -> None:
    from services.wire.cluster_tls import TLS_DIR_ENV, generate

    out = generate(args.dir, valid_days=args.days)
    print(f"wrote the cluster credential (ca.crt, tls.crt, tls.key) to {out}; set {TLS_DIR_ENV}={out} on every "
          f"node, or: kubectl create secret generic omni-cluster-tls --from-file={out}")


def _new_key(args: argparse.Namespace) -> None:
    from pathlib import Path

    from services.auth import add_key

    key = add_key(Path(args.keys_file), args.principal)
    print(key)  # stdout: the key alone, for `KEY=$(omni auth new-key ...)`
    print(f"added the hash of a new API key for {args.principal!r} to {args.keys_file}; the key above is shown once",
          file=sys.stderr)


def _serve(args: argparse.Namespace) -> None:
    from services.serving.serve_cmd import run_serve

    run_serve(args)


def _bench_code2wav(args: argparse.Namespace) -> None:
    from services.bench import code2wav

    code2wav.main(args.rest)


def _bench_latency(args: argparse.Namespace) -> None:
    from services.bench import latency

    latency.main(args.rest)


def _bench_input(args: argparse.Namespace) -> None:
    from services.bench import input as input_bench

    input_bench.main(args.rest)


def _bench_load(args: argparse.Namespace) -> None:
    from services.bench import load

    load.main(args.rest)


def _bench_mtp(args: argparse.Namespace) -> None:
    from services.bench import mtp

    mtp.main(args.rest)


def _bench_soak(args: argparse.Namespace) -> None:
    from services.bench import soak

    soak.main(args.rest)


def _bench_hops(args: argparse.Namespace) -> None:
    from services.bench import hops

    hops.main(args.rest)


_PASSTHROUGH = {"bench"}  # subcommands whose options belong to the module they run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni", description="Qwen3-Omni serving: checkpoints, generation, benchmarks")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    ckpt = sub.add_parser("checkpoint", help="checkpoint tools")
    ckpt_sub = ckpt.add_subparsers(dest="checkpoint_command", required=True)
    tiny = ckpt_sub.add_parser("tiny", help="write a tiny random-weight Qwen3-Omni checkpoint (HF format)")
    tiny.add_argument("dir", help="output directory")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed; the same seed gives byte-identical weights")
    tiny.add_argument("--max-shard-size", default=None, help="shard the weights, e.g. 20MB (writes an index)")
    tiny.add_argument("--variant", choices=["instruct", "thinking", "captioner"], default="instruct",
                      help="which released model it stands for: instruct (Thinker and Talker), thinking or "
                           "captioner (the Thinker alone, text out)")
    tiny.set_defaults(func=_checkpoint_tiny)

    from services.generate import add_generate_arguments

    gen = sub.add_parser("generate", help="run one turn in this process: streamed text, a WAV, optional JSON")
    add_generate_arguments(gen)
    gen.set_defaults(func=_generate)

    from services.chat_cmd import add_chat_arguments

    chat = sub.add_parser("chat", help="one turn against a running deployment (omni serve) over gRPC")
    add_chat_arguments(chat)
    chat.set_defaults(func=_chat)

    from services.serving.serve_cmd import add_serve_arguments

    serve = sub.add_parser("serve", help="start a local Ray cluster and every stage as a Ray Serve application")
    add_serve_arguments(serve)
    serve.set_defaults(func=_serve)

    tls = sub.add_parser("cluster-tls", help="write a fresh cluster credential (a CA and the stages' certificate) "
                                             "for mutual TLS between stages")
    tls.add_argument("dir", help="output directory (created 0700; tls.key is written 0600)")
    tls.add_argument("--days", type=int, default=365, help="validity in days (default: %(default)s)")
    tls.set_defaults(func=_cluster_tls)

    auth = sub.add_parser("auth", help="client credentials")
    auth_sub = auth.add_subparsers(dest="auth_command", required=True)
    new_key = auth_sub.add_parser("new-key", help="make an API key for a principal: print it, append its hash to "
                                                  "the gateway's key file")
    new_key.add_argument("principal", help="the tenant the key works for (owns its sessions)")
    new_key.add_argument("--keys-file", required=True, help="the hashed key file (auth.api_keys_file); created if "
                                                            "missing")
    new_key.set_defaults(func=_new_key)

    bench = sub.add_parser("bench", help="benchmarks that print tables")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, func, help_text in (
        ("code2wav", _bench_code2wav, "streaming Code2Wav vs full forward vs re-decoding left context"),
        ("latency", _bench_latency, "reference generate vs the streaming conductor: TTFT, first audio, RTF"),
        ("hops", _bench_hops, "per-message round trip and throughput of each inter-stage gRPC route"),
        ("input", _bench_input, "end of turn to first audio: live prefill vs the whole turn, for streamed audio of "
                                 "2/30/120 s and a 20-turn conversation"),
        ("load", _bench_load, "N conversations at once for several N: first audio, RTF, audio per second, batch "
                              "sizes"),
        ("mtp", _bench_mtp, "one MTP step at batch 1, 8, 32: ours vs the reference code predictor's generate"),
        ("soak", _bench_soak, "client loops against a deployment for M minutes: latency percentiles and every "
                              "omni-serve process's memory per minute"),
    ):
        p = bench_sub.add_parser(name, help=help_text, add_help=False)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in _PASSTHROUGH:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except OmniError as e:
        print(f"omni: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("omni: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
