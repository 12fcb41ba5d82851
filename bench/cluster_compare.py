"""Disaggregated against colocated on one machine (kept for its command; now a thin wrapper).

    python -m bench.cluster_compare [--model DIR] [--num-requests 32] [--concurrency 8]

runs the committed comparison through `baton bench compare`: 1 prefill + 1 decode worker
(`pd:1x1`) against 2 colocated workers (`colocated:2`), ShareGPT-like lengths clipped to prompts
of at most 512 tokens and outputs of at most 64, greedy with eos ignored, at a fixed
concurrency, with SLOs of 5 s TTFT and 350 ms TPOT for goodput. Writes result.json and the plots
into --out (default bench/results/compare_pd_vs_colocated_cpu/). With the defaults this is the
command of the committed result; for anything else use `baton bench` directly.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bench.__main__ import main as bench_main

DEFAULT_OUT = "bench/results/compare_pd_vs_colocated_cpu"
CONFIGS = ("pd:1x1", "colocated:2")
SLO_TTFT_MS = 5000  # chosen from a CPU pilot run: about its TTFT at this load
SLO_TPOT_MS = 350


def bench_argv(args: argparse.Namespace) -> list[str]:
    """The `baton bench compare` arguments this wrapper stands for."""
    worker = f"max-num-batched-tokens={args.max_num_batched_tokens}"
    argv = ["compare", *(f"{c}:{worker}" if args.max_num_batched_tokens else c for c in CONFIGS)]
    if args.model:
        argv += ["--model", args.model]
    argv += ["--workload", "sharegpt", "--max-input-len", "512", "--max-output-len", "64"]
    argv += ["--num-requests", str(args.num_requests), "--concurrency", str(args.concurrency)]
    argv += ["--slo-ttft-ms", str(SLO_TTFT_MS), "--slo-tpot-ms", str(SLO_TPOT_MS)]
    argv += ["--seed", str(args.seed), "--out", args.out]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the wrapper's options and run the comparison; the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the demo model)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="workers' step token budget (default: the workers' own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    return bench_main(bench_argv(parser.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
