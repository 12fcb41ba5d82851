"""One-row linear layers (`baton_kernels.gemv`) against cuBLAS (torch's `F.linear`), on the
projections of a Llama-3.2-1B-shaped model in bfloat16 (batch-1 decode).

Microseconds per call and the weight bandwidth each reaches, and which of the two the engine
runs for that shape; and the gate/up projection with its activation, cuBLAS and `silu_mul`
against the fused `gemv_gate_up_silu`. Each op is timed as the decode graph runs it: one call
per layer on that layer's own weights (16 copies, more than the L2 cache holds), captured in a
CUDA graph and replayed. `--sweep` also times every launch configuration of a grid, which is how
`baton_kernels.gemv.default_config`'s rules were chosen.

`--batches` times cuBLAS at those row counts in two weight layouts and with either library.

    python -m experiments.gpu_gemv [--sweep] [--batches 32,128,8192] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.graph_timing import DTYPE, LAYERS, graph_seconds, weight_copies
from bench.machine import describe_machine

SHAPES = {  # projection: (N, K)
    "qkv_proj": (3072, 2048),
    "o_proj": (2048, 2048),
    "gate_up_proj": (16384, 2048),
    "down_proj": (2048, 8192),
    "lm_head": (128256, 2048),
}
SWEEP = {"block_n": (1, 2, 4, 8), "block_k": (512, 1024, 2048), "num_warps": (4, 8),
         "num_stages": (1, 3)}  # fmt: skip


def _row(op: str, n: int, k: int, cublas_s: float, gemv_s: float) -> dict[str, Any]:
    nbytes = n * k * 2
    return {
        "op": op,
        "n": n,
        "k": k,
        "cublas_us": cublas_s * 1e6,
        "gemv_us": gemv_s * 1e6,
        "cublas_weight_tb_per_s": nbytes / cublas_s / 1e12,
        "gemv_weight_tb_per_s": nbytes / gemv_s / 1e12,
        "speedup": cublas_s / gemv_s,
    }


def compare() -> list[dict[str, Any]]:
    """Each projection at one row: cuBLAS against `gemv`, and which one the engine runs."""
    from baton_kernels.gemv import gemv, takes

    out = []
    for op, (n, k) in SHAPES.items():
        weights = weight_copies(n, k)
        x = torch.randn(1, k, dtype=DTYPE, device="cuda")
        cublas = graph_seconds([partial(F.linear, x, w) for w in weights])
        ours = graph_seconds([partial(gemv, x, w) for w in weights])
        out.append({**_row(op, n, k, cublas, ours), "engine_uses_gemv": takes(x, weights[0])})
        del weights
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def compare_gate_up() -> dict[str, Any]:
    """The MLP's first half at one row, per layer: cuBLAS's gate/up GEMM then `silu_mul`
    against `gemv_gate_up_silu` (one kernel), each with its best configurations of SWEEP."""
    from baton_kernels.gemv import GemvConfig, gemv_gate_up_silu
    from baton_kernels.silu_mul import silu_mul

    n, k = SHAPES["gate_up_proj"]
    weights = weight_copies(n, k)
    x = torch.randn(1, k, dtype=DTYPE, device="cuda")
    cublas = graph_seconds([partial(lambda w: silu_mul(F.linear(x, w)), w) for w in weights])
    timed = []
    for values in itertools.product(*SWEEP.values()):
        cfg = GemvConfig(*values)
        if cfg.block_n < 2 or cfg.block_n * cfg.block_k > 64 * 32 * cfg.num_warps:
            continue
        s = graph_seconds([partial(gemv_gate_up_silu, x, w, None, cfg) for w in weights])
        timed.append((s, cfg))
    timed.sort()
    default_s = graph_seconds([partial(gemv_gate_up_silu, x, w) for w in weights])
    row = {
        "op": "gate_up_proj + silu_mul", "n": n, "k": k,
        "cublas_and_silu_mul_us": cublas * 1e6, "fused_default_us": default_s * 1e6,
        "fused_best": [{"us": s * 1e6, **c._asdict()} for s, c in timed[:3]],
    }  # fmt: skip
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def sweep() -> list[dict[str, Any]]:
    """Every configuration of SWEEP on every projection at one row; the best three each."""
    from baton_kernels.gemv import GemvConfig, default_config, gemv

    out = []
    for op, (n, k) in SHAPES.items():
        weights = weight_copies(n, k)
        x = torch.randn(1, k, dtype=DTYPE, device="cuda")
        timed = []
        for values in itertools.product(*SWEEP.values()):
            cfg = GemvConfig(*values)
            if cfg.block_n * cfg.block_k > 64 * 32 * cfg.num_warps or cfg.block_k > k:
                continue  # the tile would spill registers
            try:
                s = graph_seconds([partial(gemv, x, w, config=cfg) for w in weights])
            except Exception as exc:  # a configuration Triton cannot build: skip it
                print(f"{op} {cfg}: {exc!r}", file=sys.stderr)
                continue
            timed.append((s, cfg))
        timed.sort()
        default = default_config(n, k)
        default_s = graph_seconds([partial(gemv, x, w) for w in weights])
        out.append({
            "op": op, "n": n, "k": k,
            "default": default._asdict(), "default_us": default_s * 1e6,
            "best": [{"us": s * 1e6, "tb_per_s": n * k * 2 / s / 1e12, **c._asdict()}
                     for s, c in timed[:3]],
        })  # fmt: skip
        del weights
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def batched(batches: list[int]) -> list[dict[str, Any]]:
    """Each projection at `batches` rows (a decode step of that many sequences, or a prompt
    step): cuBLAS as the engine calls it (`F.linear`, the weight (N, K): a TN GEMM), on the
    weight stored transposed ((K, N), an NN GEMM: other kernels), and with torch's cuBLASLt
    preference; microseconds and the weight bandwidth of each. Which layout or library the
    engine should hold for its batched GEMMs (not yet measured: at M = 128, cuBLAS streams
    the attention projections and the down projection at 1.3-2.1 TB/s)."""
    default_library = torch.backends.cuda.preferred_blas_library()
    out = []
    for op, (n, k) in SHAPES.items():
        weights = weight_copies(n, k)
        transposed = [w.t().contiguous() for w in weights]
        for m in batches:
            x = torch.randn(m, k, dtype=DTYPE, device="cuda")
            row: dict[str, Any] = {"op": op, "m": m, "n": n, "k": k}
            for name, calls in (
                ("tn", [partial(F.linear, x, w) for w in weights]),
                ("nn", [partial(torch.matmul, x, w) for w in transposed]),
            ):
                for library in ("cublas", "cublaslt"):
                    torch.backends.cuda.preferred_blas_library(library)
                    try:
                        us = graph_seconds(calls) * 1e6
                    finally:
                        torch.backends.cuda.preferred_blas_library(default_library)
                    row[f"{name}_{library}_us"] = us
                    row[f"{name}_{library}_weight_tb_per_s"] = n * k * 2 / us / 1e6
            out.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        del weights, transposed
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time a grid of configurations")
    parser.add_argument(
        "--batches",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[],
        help="also time cuBLAS's layouts and libraries at these row counts, e.g. 32,128,8192",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_gemv.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("experiments.gpu_gemv needs a CUDA GPU")
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "benchmark": "gpu_gemv",
        "dtype": "bfloat16",
        "layers": LAYERS,
        "compare": compare(),
        "gate_up_silu": compare_gate_up(),
    }
    if args.sweep:
        result["sweep"] = sweep()
    if args.batches:
        result["batched"] = batched(args.batches)
    result["machine"] = describe_machine()
    result["command"] = " ".join(["python -m experiments.gpu_gemv", *(argv or sys.argv[1:])])
    text = json.dumps(result, indent=2) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
