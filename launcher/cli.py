"""The `baton` command line: one subcommand per task.

    baton generate [options] PROMPT     stream one answer from the offline engine
    baton make-tiny-model DIR --arch A  write a small random-weight model for tests
    baton demo-model                    convert (once) and print the demo model's directory
    baton serve [--model DIR] [...]     router and workers on this machine
    baton train-speculator --model DIR --out DIR   train an MLP speculator (or EAGLE head)
    baton bench run|sweep|compare ...   benchmark a server, or compare cluster configurations
    baton autoscale --kubernetes ...    scale prefill and decode Deployments on their SLOs

torch and transformers are imported inside the commands, so `baton --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from launcher.autoscale import add_autoscale
from launcher.command import EXIT_USAGE, UsageError, add_subcommand, resolve_model_dir
from launcher.config_file import with_config_file
from launcher.serve import add_serve
from worker_common.engine_args import MODEL, add_engine_args, engine_kwargs

TINY_MODEL_ARCHS = ("llama", "qwen2", "qwen3", "mistral")  # engine.models.tiny's (no torch here)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `baton` CLI on `argv` (default: sys.argv[1:]) and return the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return int(args.run(parse_config_file(parser, argv, args)))
    except UsageError as exc:
        print(f"{args.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line `argv`, with the flags of its `--config` file (tests use it)."""
    parser = build_parser()
    return parse_config_file(parser, list(argv), parser.parse_args(argv))


def parse_config_file(
    parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace
) -> argparse.Namespace:
    """`args` parsed again with the `--config` file's flags before the typed ones, if it names
    one (UsageError for a bad file); else `args`."""
    if getattr(args, "config", None) is None:
        return args
    command = args.prog.split()[-1]
    return parser.parse_args(with_config_file(argv, command, args.config_parser, args.config))


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
    add_serve(commands)
    add_autoscale(commands)
    _add_train_speculator(commands)
    _add_bench(commands)
    return parser


def _version() -> str:
    """The installed distribution's version, or 'unknown' when running from a bare checkout."""
    try:
        return metadata.version("baton")
    except metadata.PackageNotFoundError:
        return "unknown"


# --- baton generate ----------------------------------------------------------------------------


def _add_generate(commands: Any) -> None:
    """`baton generate`: engine, sampling and prompt options."""
    sub = add_subcommand(
        commands, "generate", "Generate an answer to one prompt, streamed to stdout."
    )
    sub.add_argument("prompt", metavar="PROMPT", help="the prompt (the user message in chat mode)")
    sub.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apply the tokenizer's chat template (default: when it has one)",
    )
    _add_sampling_options(sub)
    model = sub.add_argument_group(MODEL, "the model, its context and numerics")
    model.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="local Hugging Face model directory (default: the demo model, "
        "SmolLM2-135M-Instruct, converted on first use)",
    )
    add_engine_args(sub, {MODEL: model}, skip={"served_model_name"})
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
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when STR is generated; repeat for several",
    )
    group.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token"
    )


def _run_generate(args: argparse.Namespace) -> int:
    """Stream the answer to `args.prompt` to stdout, ending with a newline."""
    model_dir = resolve_model_dir(args.model)
    chat = has_chat_template(model_dir) if args.chat is None else args.chat
    from engine import LLM, SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            max_tokens=args.max_tokens,
            stop=list(args.stop),
            ignore_eos=args.ignore_eos,
        )
        llm = LLM(model=str(model_dir), **engine_kwargs(args))
        prompt: Any = [{"role": "user", "content": args.prompt}] if chat else args.prompt
        _stream(llm.stream(prompt, params, chat=chat))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return 0


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
    sub = add_subcommand(
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
    from engine.models.tiny import make_tiny_model

    try:
        path = make_tiny_model(args.path, args.arch, args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(path)
    return 0


# --- baton demo-model --------------------------------------------------------------------------


def _add_demo_model(commands: Any) -> None:
    """`baton demo-model [--cache-dir DIR]`."""
    sub = add_subcommand(
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


# --- baton train-speculator -------------------------------------------------------------------


def _add_train_speculator(commands: Any) -> None:
    """`baton train-speculator --model DIR --out DIR [--data FILE ...] [...]`."""
    sub = add_subcommand(
        commands,
        "train-speculator",
        "Train an MLP speculator (IBM's fms format) or, with --method eagle, an EAGLE-1 head for "
        "a model: stage 1 on text, stage 2 on the model's own answers; load it with "
        '--speculative-config \'{"method": "mlp_speculator", "model": OUT}\' (or "eagle").',
    )
    sub.add_argument("--model", type=Path, required=True, metavar="DIR",
                     help="the target: a local Hugging Face model directory")
    sub.add_argument("--out", type=Path, required=True, metavar="DIR",
                     help="directory to write the speculator into")
    sub.add_argument("--method", choices=("mlp_speculator", "eagle"), default="mlp_speculator",
                     help="what to train (default: %(default)s)")
    sub.add_argument("--data", type=Path, nargs="+", default=[], metavar="PATH",
                     help="text files or directories (their .py .txt .md .rst files) to train on "
                          "(default: Python's pydoc_data topics)")
    for flag, help_text in (("--n-predict", "MLP heads: tokens drafted per step (default: 3)"),
                            ("--inner-dim", "the MLP heads' width, 0 = the model's hidden size "
                                            "(default: 0)")):  # fmt: skip
        sub.add_argument(flag, type=int, default=None, metavar="N", help=help_text)
    for flag, kind, default, help_text in (
        ("--seq-len", int, 64, "positions per training sequence (stage 2: tokens generated)"),
        ("--batch-size", int, 8, "sequences per step"),
        ("--stage1-steps", int, 200, "steps on text"),
        ("--stage2-steps", int, 100, "steps on the model's own answers"),
        ("--stage2-prompts", int, 64, "prompts the model answers for stage 2"),
        ("--lr", float, 1e-3, "peak learning rate (AdamW; warm-up, then cosine)"),
        ("--seed", int, 0, "seed: the same seed and threads give the same speculator"),
        ("--threads", int, None, "torch CPU threads (default: torch's)"),
    ):
        sub.add_argument(flag, type=kind, default=default, metavar="N",
                         help=f"{help_text} (default: %(default)s)")  # fmt: skip
    sub.add_argument("--tie-weights", action="store_true",
                     help="MLP: share one embedding, head and norm across the heads (smaller)")
    sub.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.set_defaults(run=_run_train_speculator)  # fmt: skip


def _run_train_speculator(args: argparse.Namespace) -> int:
    """Train, save, and print the output directory and the final losses."""
    model_dir = resolve_model_dir(args.model)
    from engine.spec_decode.train_mlp import TrainOptions, train_speculator

    mlp_only = {"--n-predict": args.n_predict, "--inner-dim": args.inner_dim,
                "--tie-weights": args.tie_weights or None}  # fmt: skip
    given = [flag for flag, value in mlp_only.items() if value is not None]
    if args.method != "mlp_speculator" and given:
        raise UsageError(f"{', '.join(given)}: MLP speculator options, not for --method "
                         f"{args.method}")  # fmt: skip
    options = TrainOptions(
        model=model_dir, out=args.out, data=list(args.data),
        n_predict=3 if args.n_predict is None else args.n_predict,
        inner_dim=args.inner_dim or 0, tie_weights=args.tie_weights, seq_len=args.seq_len,
        batch_size=args.batch_size, stage1_steps=args.stage1_steps,
        stage2_steps=args.stage2_steps, stage2_prompts=args.stage2_prompts, lr=args.lr,
        seed=args.seed, threads=args.threads, device=args.device, method=args.method,
    )  # fmt: skip
    try:
        summary = train_speculator(options, progress=not args.quiet)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(args.out)
    for key, losses in summary.items():
        if key.startswith("stage"):  # stage1_head_losses: stage1 head losses
            print(f"{key.replace('_', ' ')}: {losses}", file=sys.stderr)
    return 0


# --- baton bench -------------------------------------------------------------------------------


def _add_bench(commands: Any) -> None:
    """`baton bench run|sweep|compare`: options live in bench.cli."""
    from bench.cli import add_bench_commands

    help_text = "Benchmark a server (run, sweep rates) or compare cluster configurations."
    sub = add_subcommand(commands, "bench", help_text)
    add_bench_commands(sub)
    sub.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    from bench.commands import BenchUsageError, run_bench

    args.prog = f"baton bench {args.bench_mode}"
    try:
        return run_bench(args)
    except BenchUsageError as exc:
        raise UsageError(str(exc)) from exc
