"""`baton bench`: the command line of the benchmark tool (run, sweep, compare).

    baton bench run --url http://127.0.0.1:8000 --workload sharegpt --num-requests 64 --rate 4
    baton bench run --grpc 127.0.0.1:50051 --model DIR --workload fixed --concurrency 8
    baton bench sweep --url URL --model NAME --rates 1,2,4,8 --slo-ttft-ms 500 --slo-tpot-ms 100
    baton bench compare --model DIR pd:1x1 colocated:2 --workload sharegpt --concurrency 8
    baton bench run --url URL --workload fixed --structured-output json-example \
        --structured-output-ratio 0.5

`run` measures one server at one load; `sweep` runs the same workload at several Poisson rates
and reports goodput against rate and the highest rate that keeps the SLO attainment target;
`compare` starts each cluster configuration (bench.cluster_config documents CONFIG) on this
machine in turn and runs the same workload against each. Any OpenAI-compatible server (vLLM,
SGLang, ...) can be the `--url` of run and sweep. Each writes OUT/result.json and PNG plots
(default OUT: bench/results/MODE-WORKLOAD-TIME) and prints a summary table. With
`--structured-output`, a share of any workload's requests carry a constraint and their answers
are checked (bench.structured).
"""

from __future__ import annotations

import argparse
import math

from bench.cluster_config import __doc__ as CONFIG_DOC
from bench.target import CLIENT_KINDS
from bench.workload import WORKLOAD_NAMES


def positive_float(text: str) -> float:
    """A float > 0; 'inf' allowed."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def rate_list(text: str) -> list[float]:
    """`1,2,4.5` -> [1.0, 2.0, 4.5]: finite rates > 0 in req/s."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a list of rates: {text!r}") from exc
    if not rates or not all(r > 0 and math.isfinite(r) for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be finite and > 0: {text!r}")
    return rates


def add_bench_commands(bench: argparse.ArgumentParser) -> None:
    """Register `run`, `sweep` and `compare` under the `bench` parser."""
    modes = bench.add_subparsers(title="modes", metavar="MODE", required=True)
    run = modes.add_parser("run", help="benchmark one server at one load",
                           description="Benchmark one server at one load.")
    _add_target(run)
    sweep = modes.add_parser("sweep", help="goodput against request rate",
                             description="Run the workload at several Poisson rates: goodput "
                             "against rate, and the highest rate that keeps SLO attainment.")
    _add_target(sweep)
    sweep.add_argument("--rates", type=rate_list, required=True, metavar="R1,R2,...",
                       help="request rates to run, req/s")
    compare = modes.add_parser(
        "compare", help="start cluster configurations in turn, same workload, side by side",
        description="Start each cluster configuration on this machine in turn, run the same "
        "workload against each, report them side by side.",
        epilog=CONFIG_DOC, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("configs", nargs="+", metavar="CONFIG",
                         help="pd:PxD[:opt...] or colocated:N[:opt...] (see below)")
    compare.add_argument("--model", default=None, metavar="DIR",
                         help="model directory to serve (default: the demo model)")
    compare.add_argument("--client", choices=CLIENT_KINDS, default="http",
                         help="talk to the router over OpenAI HTTP or gRPC (default: http)")
    compare.add_argument("--rates", type=rate_list, default=None, metavar="R1,R2,...",
                         help="also sweep these rates (req/s) on each configuration")
    for mode, sub in (("run", run), ("sweep", sweep), ("compare", compare)):
        _add_common(sub)
        sub.set_defaults(bench_mode=mode, bench_parser=sub)


def _add_target(sub: argparse.ArgumentParser) -> None:
    group = sub.add_argument_group("target")
    group.add_argument("--url", default="", help="OpenAI-compatible server, e.g. "
                       "http://127.0.0.1:8000 (the /v1 suffix is optional)")
    group.add_argument("--grpc", default="", metavar="HOST:PORT",
                       help="Baton router's gRPC address (baton.v1.Router/Generate)")
    group.add_argument("--client", choices=CLIENT_KINDS, default=None,
                       help="which of the two to use (default: grpc if only --grpc is given)")
    group.add_argument("--model", default=None, metavar="NAME|DIR",
                       help="served model name, or a model directory (its name is used, and "
                       "its config.json gives the vocabulary size); default: the server's first "
                       "model in /v1/models")
    group.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")


def _add_common(sub: argparse.ArgumentParser) -> None:
    _add_workload(sub)
    _add_arrivals(sub)
    _add_slo_and_sampling(sub)
    out = sub.add_argument_group("output")
    out.add_argument("--out", default=None, metavar="DIR",
                     help="result directory (default: bench/results/MODE-WORKLOAD-TIME)")
    out.add_argument("--warmup", type=int, default=1, metavar="N",
                     help="short requests sent at once before measuring (default: %(default)s;"
                     " compare: at least one per worker of each configuration)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_workload(sub: argparse.ArgumentParser) -> None:
    g = sub.add_argument_group("workload (unset lengths keep each workload's defaults)")
    g.add_argument("--workload", choices=WORKLOAD_NAMES, default="sharegpt",
                   help="fixed: token ids of fixed lengths; sharegpt: lognormal lengths; prefix: "
                   "shared system prompts, Zipf tenants; multiturn: chat sessions; long: long "
                   "prompts; trace: replay a JSONL file (default: %(default)s)")
    g.add_argument("--num-requests", type=int, default=64, help="default: %(default)s")
    g.add_argument("--seed", type=int, default=0, help="workload and arrival seed (default: 0)")
    g.add_argument("--model-dir", default=None, metavar="DIR",
                   help="model directory whose config.json gives the vocabulary size")
    g.add_argument("--vocab-size", type=int, default=None, help="bound of token-id prompts")
    for flag, kind, text in [
        ("--input-len", int, "fixed, long: prompt tokens"),
        ("--output-len", int, "fixed, long, prefix, multiturn: output tokens"),
        ("--range-ratio", float, "fixed, long, prefix, multiturn: spread lengths by +/- this"),
        ("--input-median", float, "sharegpt: median prompt tokens"),
        ("--input-sigma", float, "sharegpt: log-space sigma of prompt lengths"),
        ("--output-median", float, "sharegpt: median output tokens"),
        ("--output-sigma", float, "sharegpt: log-space sigma of output lengths"),
        ("--min-input-len", int, "sharegpt: clip prompts to at least this"),
        ("--max-input-len", int, "sharegpt: clip prompts to at most this"),
        ("--min-output-len", int, "sharegpt: clip outputs to at least this"),
        ("--max-output-len", int, "sharegpt: clip outputs to at most this"),
        ("--num-prefixes", int, "prefix: tenants (system prompts)"),
        ("--prefix-len", int, "prefix: system prompt tokens"),
        ("--question-len", int, "prefix: question tokens"),
        ("--zipf-s", float, "prefix: Zipf exponent of tenant popularity"),
        ("--turns", int, "multiturn: turns per session"),
        ("--question-words", int, "multiturn: words per user message"),
        ("--system-words", int, "multiturn: words of each session's system message"),
        ("--trace", str, "trace: the JSONL file"),
        ("--trace-speedup", float, "trace: divide the trace's time offsets by this"),
    ]:
        g.add_argument(flag, type=kind, default=None, help=text)


def _add_arrivals(sub: argparse.ArgumentParser) -> None:
    g = sub.add_argument_group("arrivals")
    g.add_argument("--rate", type=positive_float, default=None,
                   help="requests per second, Poisson (default: all at once, or the trace's "
                   "timestamps); sweep uses --rates")
    g.add_argument("--burstiness", type=positive_float, default=1.0,
                   help="gamma shape of the gaps: 1 Poisson, < 1 burstier (default: 1)")
    g.add_argument("--burst-size", type=int, default=None,
                   help="release requests in bursts of this size (mean rate still --rate)")
    g.add_argument("--concurrency", type=int, default=None,
                   help="most requests in flight (alone: a fixed-concurrency closed loop)")


def _add_slo_and_sampling(sub: argparse.ArgumentParser) -> None:
    g = sub.add_argument_group("SLO (goodput counts requests meeting both limits)")
    g.add_argument("--slo-ttft-ms", type=positive_float, default=None, help="TTFT limit, ms")
    g.add_argument("--slo-tpot-ms", type=positive_float, default=None, help="TPOT limit, ms")
    g.add_argument("--slo-attainment", type=float, default=0.9,
                   help="attainment target for the highest sustainable rate (default: 0.9)")
    s = sub.add_argument_group("sampling")
    s.add_argument("--temperature", type=float, default=0.0, help="default: 0 (greedy)")
    s.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly max_tokens (vLLM's extra field; default: on)")
    s.add_argument("--timeout", type=positive_float, default=600.0,
                   help="seconds one request may take (default: %(default)s)")
    g = sub.add_argument_group("structured outputs (bench.structured)")
    g.add_argument("--structured-output", default=None, metavar="json-example|regex-example|"
                   "choice-example|FILE",
                   help="the constraint structured requests carry: a built-in example, or a "
                   "JSON file holding a JSON schema or a vLLM structured_outputs object; sent "
                   "as response_format (a bare schema) or structured_outputs over HTTP, as "
                   "SamplingParams.structured_outputs over gRPC, without ignore_eos")
    g.add_argument("--structured-output-ratio", type=float, default=None, metavar="R",
                   help="share of the requests (a seeded sample) that carry it (default: 1)")
