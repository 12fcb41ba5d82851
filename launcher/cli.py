"""The `baton` command line: one subcommand per task.

    baton generate [options] PROMPT     stream one answer from the offline engine
    baton make-tiny-model DIR --arch A  write a small random-weight model for tests
    baton demo-model                    convert (once) and print the demo model's directory
    baton serve [--model DIR] [...]     router and workers on this machine
    baton bench run|sweep|compare ...   benchmark a server, or compare cluster configurations

torch and transformers are imported inside the commands, so `baton --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

TINY_MODEL_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = ("auto", "float32", "bfloat16", "float16")
EXIT_USAGE = 2  # argparse's exit status for a bad command line; also used for a bad request
_BYTE_UNITS = {
    "": 1,
    "k": 1000,
    "m": 1000**2,
    "g": 1000**3,
    "t": 1000**4,
    "ki": 1024,
    "mi": 1024**2,
    "gi": 1024**3,
    "ti": 1024**4,
}


class UsageError(Exception):
    """A problem with what the user asked for; reported as `error: ...` with exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `baton` CLI on `argv` (default: sys.argv[1:]) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except UsageError as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="baton",
        description="Baton: disaggregated prefill/decode LLM serving.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_generate(commands)
    _add_make_tiny_model(commands)
    _add_demo_model(commands)
    _add_serve(commands)
    _add_bench(commands)
    return parser


def _version() -> str:
    """The installed distribution's version, or 'unknown' when running from a bare checkout."""
    try:
        return metadata.version("baton")
    except metadata.PackageNotFoundError:
        return "unknown"


def _subparser(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register subcommand `name`; its errors name it as `baton NAME`."""
    sub: argparse.ArgumentParser = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(prog=f"baton {name}")
    return sub


# --- baton generate ----------------------------------------------------------------------------


def _add_generate(commands: Any) -> None:
    """`baton generate`: engine, sampling and prompt options."""
    sub = _subparser(commands, "generate", "Generate an answer to one prompt, streamed to stdout.")
    sub.add_argument("prompt", metavar="PROMPT", help="the prompt (the user message in chat mode)")
    sub.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="local Hugging Face model directory (default: the demo model, "
        "SmolLM2-135M-Instruct, converted on first use)",
    )
    _add_sampling_options(sub)
    sub.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the tokenizer's chat template (default: when it has one)",
    )
    _add_engine_options(sub)
    sub.set_defaults(run=_run_generate)


def _add_sampling_options(sub: argparse.ArgumentParser) -> None:
    """SamplingParams fields, with vLLM's meanings."""
    group = sub.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        metavar="N",
        help="most tokens to generate (default: %(default)s)",
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="0 = greedy (default: %(default)s)",
    )
    group.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        metavar="P",
        help="nucleus sampling mass, 1 = off (default: %(default)s)",
    )
    group.add_argument(
        "--top-k",
        type=int,
        default=-1,
        metavar="K",
        help="keep the K likeliest tokens, -1 = off (default: %(default)s)",
    )
    group.add_argument(
        "--min-p",
        type=float,
        default=0.0,
        metavar="P",
        help="drop tokens below P x the top probability, 0 = off (default: %(default)s)",
    )
    group.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="S",
        help="seed of this request's sampler (default: random)",
    )
    group.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when STR is generated; repeat for several",
    )
    group.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token"
    )


def _add_engine_options(sub: argparse.ArgumentParser) -> None:
    """LLM(...) constructor options; unset ones keep the engine's defaults."""
    group = sub.add_argument_group("engine")
    group.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="weight and activation dtype (default: %(default)s, from the config)",
    )
    group.add_argument(
        "--block-size",
        type=int,
        default=16,
        metavar="TOKENS",
        help="tokens per KV cache block (default: %(default)s)",
    )
    group.add_argument(
        "--max-num-seqs", type=int, default=None, metavar="N", help="most sequences in one batch"
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        metavar="N",
        help="most tokens in one forward pass (chunked prefill budget)",
    )
    group.add_argument(
        "--kv-cache-memory-bytes",
        type=parse_bytes,
        default=None,
        metavar="BYTES",
        help="KV cache size in bytes; accepts suffixes, e.g. 512MiB or 2G",
    )


def parse_bytes(text: str) -> int:
    """Parse a byte count such as `1073741824`, `512MiB`, `2G` or `1.5GB` into bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (try 512MiB or 2G)")
    number, unit = match.groups()
    return int(float(number) * _BYTE_UNITS[unit or ""])


def _run_generate(args: argparse.Namespace) -> int:
    """Stream the answer to `args.prompt` to stdout, ending with a newline."""
    model_dir = _resolve_model_dir(args.model)
    chat = has_chat_template(model_dir) if args.chat is None else args.chat
    from engine import LLM, SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=list(args.stop),
            ignore_eos=args.ignore_eos,
        )
        llm = LLM(model=str(model_dir), **_engine_kwargs(args))
        prompt: Any = [{"role": "user", "content": args.prompt}] if chat else args.prompt
        _stream(llm.stream(prompt, params, chat=chat))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return 0


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """LLM constructor arguments the user set; the rest keep the engine's defaults."""
    kwargs: dict[str, Any] = {"dtype": args.dtype, "block_size": args.block_size}
    optional = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
    }
    kwargs.update({name: value for name, value in optional.items() if value is not None})
    return kwargs


def _stream(outputs: Any) -> None:
    """Write each output's `delta_text` as it arrives, then a newline."""
    try:
        for out in outputs:
            sys.stdout.write(out.delta_text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `baton generate ... | head`: the reader left, stop quietly
        # Point stdout at the null device so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _resolve_model_dir(model: Path | None) -> Path:
    """The model directory to load: `model` if it is a model directory, else the demo model."""
    if model is None:
        from engine.models.demo import DemoModelUnavailableError, ensure_demo_model

        try:
            return ensure_demo_model()
        except DemoModelUnavailableError as exc:
            raise UsageError(str(exc)) from exc
    if not model.is_dir():
        raise UsageError(f"model directory not found: {model}")
    if not (model / "config.json").is_file():
        raise UsageError(f"not a Hugging Face model directory (no config.json): {model}")
    return model


def has_chat_template(model_dir: Path) -> bool:
    """True if the tokenizer saved in `model_dir` carries a chat template."""
    if any((model_dir / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return True
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template"))


# --- baton make-tiny-model ---------------------------------------------------------------------


def _add_make_tiny_model(commands: Any) -> None:
    """`baton make-tiny-model DIR --arch A [--seed N]`."""
    sub = _subparser(
        commands,
        "make-tiny-model",
        "Write a small random-weight model with a trained tokenizer and chat "
        "template (for tests: no model hub is needed).",
    )
    sub.add_argument("path", type=Path, metavar="DIR", help="directory to write the model into")
    sub.add_argument(
        "--arch", choices=TINY_MODEL_ARCHS, required=True, help="model family to imitate"
    )
    sub.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the random weights (default: %(default)s)",
    )
    sub.set_defaults(run=_run_make_tiny_model)


def _run_make_tiny_model(args: argparse.Namespace) -> int:
    """Write the tiny model and print its directory."""
    from launcher.tiny_model import make_tiny_model

    try:
        path = make_tiny_model(args.path, args.arch, args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(path)
    return 0


# --- baton demo-model --------------------------------------------------------------------------


def _add_demo_model(commands: Any) -> None:
    """`baton demo-model [--cache-dir DIR]`."""
    sub = _subparser(
        commands,
        "demo-model",
        "Convert the demo model (SmolLM2-135M-Instruct) if needed and print its directory.",
    )
    sub.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="Baton's cache root (default: $BATON_CACHE_DIR, else "
        "$XDG_CACHE_HOME/baton, else ~/.cache/baton)",
    )
    sub.set_defaults(run=_run_demo_model)


def _run_demo_model(args: argparse.Namespace) -> int:
    """Print the demo model's directory, converting it first if needed."""
    from engine.models.demo import DemoModelUnavailableError, ensure_demo_model

    try:
        path = ensure_demo_model(args.cache_dir)
    except DemoModelUnavailableError as exc:
        raise UsageError(str(exc)) from exc
    print(path)
    return 0


# --- baton serve -------------------------------------------------------------------------------


def _add_serve(commands: Any) -> None:
    """`baton serve`: the cluster on this machine."""
    sub = _subparser(commands, "serve", "Serve the OpenAI API and gRPC with local workers.")
    sub.add_argument("--model", type=Path, default=None, help="model directory (default: demo)")
    pair_help = "default 1, or 0 with --colocated"
    sub.add_argument("--prefill-workers", type=int, default=None, help=pair_help)
    sub.add_argument("--decode-workers", type=int, default=None, help=pair_help)
    sub.add_argument("--colocated", type=int, default=0, help="colocated workers (both roles)")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8000, help="OpenAI HTTP port")
    sub.add_argument("--grpc-port", type=int, default=50051, help="public gRPC port")
    sub.add_argument(
        "--policy",
        default="",
        choices=["", "round_robin", "least_loaded", "prefix_aware"],
        help="routing (default: prefix_aware)",
    )
    sub.add_argument("--routers", type=int, default=1, help="routers (>1 needs --redis-url)")
    sub.add_argument("--redis-url", default="", help="prefix index in Redis (redis://...)")
    sub.add_argument("--cluster-name", default="default", help="Redis key namespace part")
    sub.add_argument("--num-kv-blocks", type=int, default=None)
    sub.add_argument("--max-num-seqs", type=int, default=None)
    sub.add_argument("--max-num-batched-tokens", type=int, default=None)
    sub.add_argument(
        "--kv-transport",
        default="",
        choices=["", "tcp", "nccl", "cuda-ipc"],
        help="how prefill workers push KV to decode workers (default: by placement: nccl between"
        " GPUs, cuda-ipc on a shared GPU, tcp on CPUs)",
    )
    sub.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from launcher.serve import ClusterSpec, serve_forever

    default_pair = 0 if args.colocated else 1
    prefill = default_pair if args.prefill_workers is None else args.prefill_workers
    decode = default_pair if args.decode_workers is None else args.decode_workers
    if (prefill == 0) != (decode == 0):
        raise UsageError("--prefill-workers and --decode-workers must both be 0 or both >= 1")
    if prefill + decode + args.colocated == 0:
        raise UsageError("no workers: give --prefill-workers/--decode-workers or --colocated")
    if args.routers < 1 or (args.routers > 1 and not args.redis_url):
        raise UsageError("--routers must be >= 1, and more than one router needs --redis-url")
    worker_args: list[str] = []
    for flag in ("num_kv_blocks", "max_num_seqs", "max_num_batched_tokens"):
        value = getattr(args, flag)
        if value is not None:
            worker_args += [f"--{flag.replace('_', '-')}", str(value)]
    spec = ClusterSpec(
        model=_resolve_model_dir(args.model),
        prefill=prefill,
        decode=decode,
        colocated=args.colocated,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        policy=args.policy,
        routers=args.routers,
        redis_url=args.redis_url,
        cluster_name=args.cluster_name,
        worker_args=worker_args,
        kv_transport=args.kv_transport,
    )
    try:
        return serve_forever(spec)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


# --- baton bench -------------------------------------------------------------------------------


def _add_bench(commands: Any) -> None:
    """`baton bench run|sweep|compare`: options live in bench.cli."""
    from bench.cli import add_bench_commands

    help_text = "Benchmark a server (run, sweep rates) or compare cluster configurations."
    sub = _subparser(commands, "bench", help_text)
    add_bench_commands(sub)
    sub.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from bench.commands import BenchUsageError, run_bench

    args.prog = f"baton bench {args.bench_mode}"
    try:
        return run_bench(args)
    except BenchUsageError as exc:
        raise UsageError(str(exc)) from exc
