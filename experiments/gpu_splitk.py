"""A split-K Triton GEMM against cuBLAS at decode row counts: a probe, not engine code.

Why the engine keeps cuBLAS for batched decode GEMMs (docs/performance.md, "Where the time
goes"): at M = 128 the projections of a Llama-3.2-1B-shaped layer sit near the H200's ridge
point, and this kernel (each program a (BLOCK_M, BLOCK_N) output tile over one of SPLIT slices of
K, float32 partials summed by a second kernel; plain pointer loads or TMA descriptors) is swept
over tiles, splits, stages and load kinds for each projection and row count. Each
configuration is checked against `F.linear` first; timings are per call in CUDA graphs over 16
weight copies (`bench.graph_timing.graph_seconds`), without and with the reduction.

    python -m experiments.gpu_splitk [--rows 32,64,128] [--out bench/results/gpu_splitk.json]
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
import triton
import triton.language as tl

from bench.graph_timing import graph_seconds, weight_copies
from bench.machine import describe_machine
from experiments.gpu_gemv import SHAPES as PROJECTIONS

DTYPE = torch.bfloat16


@triton.jit
def _splitk_kernel(
    x_ptr, w_ptr, part_ptr, M, N, K, stride_xm, stride_wn, K_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k0 = pid_k * K_SPLIT
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + (k0 + offs_k)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(0, K_SPLIT, BLOCK_K):
        a = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        b = tl.load(w_ptrs)
        acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dst = part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(dst, acc, mask=m_mask[:, None])


@triton.jit
def _splitk_desc_kernel(
    x_ptr, w_ptr, part_ptr, M, N, K, K_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    xd = tl.make_tensor_descriptor(x_ptr, [M, K], [K, 1], [BLOCK_M, BLOCK_K])
    wd = tl.make_tensor_descriptor(w_ptr, [N, K], [K, 1], [BLOCK_N, BLOCK_K])
    k0 = pid_k * K_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(k0, k0 + K_SPLIT, BLOCK_K):
        a = xd.load([pid_m * BLOCK_M, k])
        b = wd.load([pid_n * BLOCK_N, k])
        acc = tl.dot(a, b.T, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dst = part_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(dst, acc, mask=(offs_m < M)[:, None])


@triton.jit
def _reduce_kernel(part_ptr, out_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def alloc(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


triton.set_allocator(alloc)


def splitk(x, w, part, cfg, desc):
    bm, bn, bk, split, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    grid = (n // bn, split, triton.cdiv(m, bm))
    if desc:
        _splitk_desc_kernel[grid](x, w, part, m, n, k, k // split, BLOCK_M=bm, BLOCK_N=bn,
                                  BLOCK_K=bk, num_warps=warps, num_stages=stages)
    else:
        _splitk_kernel[grid](x, w, part, m, n, k, x.stride(0), w.stride(0), k // split,
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                             num_stages=stages)
    return part


def splitk_reduced(x, w, part, out, cfg, desc):
    splitk(x, w, part, cfg, desc)
    mn = out.numel()
    _reduce_kernel[(triton.cdiv(mn, 1024),)](part, out, mn, SPLIT=cfg[3], BLOCK=1024)
    return out


# gpu_gemv's projections but the logits, named as in the committed result ("qkv", ...)
SHAPES = {op.removesuffix("_proj"): nk for op, nk in PROJECTIONS.items() if op != "lm_head"}


def sweep(ms: list[int]) -> list[dict[str, Any]]:
    """The best four configurations of each projection at each row count, against cuBLAS."""
    torch.manual_seed(0)
    results = []
    for op, (n, k) in SHAPES.items():
        weights = weight_copies(n, k)
        for m in ms:
            x = torch.randn(m, k, dtype=DTYPE, device="cuda")
            ref = F.linear(x, weights[0]).float()
            cublas = graph_seconds([partial(F.linear, x, w) for w in weights])
            timed = []
            for bm, bn, bk, split, warps, stages, desc in itertools.product(
                (64, 128), (32, 64, 128), (64, 128), (1, 2, 4, 8), (4,), (3, 5), (0, 1)
            ):
                if bm > max(64, m) or k % (split * bk) or n % bn:
                    continue
                if bm * bk + bn * bk > 64 * 256 * 2 and stages > 3:
                    continue
                if n // bn * split * triton.cdiv(m, bm) < 66 or n // bn * split > 1056:
                    continue
                cfg = (bm, bn, bk, split, warps, stages)
                part = torch.empty(split, m, n, dtype=torch.float32, device="cuda")
                try:
                    got = splitk(x, weights[0], part, cfg, desc).sum(0)
                    err = (got - ref).abs().max().item()
                    if err > 0.05:
                        print(op, m, cfg, desc, "wrong", err, file=sys.stderr)
                        continue
                    s = graph_seconds([partial(splitk, x, w, part, cfg, desc) for w in weights])
                except Exception as exc:
                    print(op, m, cfg, desc, repr(exc)[:200], file=sys.stderr)
                    continue
                timed.append((s, cfg, desc))
            timed.sort()
            best = []
            for s, cfg, desc in timed[:4]:
                part = torch.empty(cfg[3], m, n, dtype=torch.float32, device="cuda")
                out = torch.empty(m, n, dtype=DTYPE, device="cuda")
                r = graph_seconds([partial(splitk_reduced, x, w, part, out, cfg, desc)
                                   for w in weights])
                best.append({"us": s * 1e6, "with_reduce_us": r * 1e6, "cfg": cfg, "desc": desc})
            row = {"op": op, "m": m, "cublas_us": cublas * 1e6,
                   "cublas_tb_s": n * k * 2 / cublas / 1e12, "best": best,
                   "best_tb_s": n * k * 2 / timed[0][0] / 1e12 if timed else None}
            print(json.dumps(row), flush=True)
            results.append(row)
        del weights
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=lambda t: [int(m) for m in t.split(",")],
                        default=[32, 64, 128])  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_splitk.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("experiments.gpu_splitk needs a CUDA GPU")
    result = {
        "benchmark": "gpu_splitk",
        "rows": sweep(args.rows),
        "machine": describe_machine(),
        "command": " ".join(["python -m experiments.gpu_splitk", *(argv or sys.argv[1:])]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
