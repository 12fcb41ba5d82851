"""The matrix-vector product of a one-row linear layer (batch-1 decode).

At batch 1 a decode step is a chain of matrix-vector products: the weights stream through once
and the time is bytes / bandwidth, so what matters is keeping enough loads in flight on every
SM. For the smaller matrices of a 1B model (8-32 MiB: q/k/v, o and down projections) cuBLAS
picks tiles that give each program too much of the matrix and reaches 1.4-2.4 TB/s on an H200;
this kernel gives each program two to four output columns, streams their weight rows along K in
long steps into a float32 accumulator of (BLOCK_N, BLOCK_K) partial products, and reduces once
at the end (`bench.gpu_gemv` measures both).

    y = x @ weight.T (+ bias)          x: (1, K)   weight: (N, K)   y: (1, N)

Measured and dropped (bench.gpu_gemv, H200): fusing the RMSNorm before a projection, or the
SwiGLU activation before the down projection, into this kernel's pass over K. Every program
then re-reads the activations (and the residual and norm weight) from L2, as many bytes as its
own weights at these tile sizes, so the fused kernel ran slower than the two kernels it
replaced. For more than one row cuBLAS's tiles were faster than this kernel's tensor-core
variant, and for matrices over 32 MiB (gate/up projection, lm_head) cuBLAS is as fast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_WEIGHT_ELEMENTS = 1 << 24  # larger matrices (over 32 MiB in bf16) stay with cuBLAS


class GemvConfig(NamedTuple):
    """One launch configuration: output columns and K elements per program, warps, stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += x[None, :] * w.to(tl.float32)
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


def default_config(n: int, k: int) -> GemvConfig:
    """The launch configuration for an (N, K) weight, from `bench.gpu_gemv --sweep` (H200):
    two output columns per program for up to 8k columns, four beyond (one to four thousand
    programs), K in steps of 1,024."""
    return GemvConfig(2 if n <= 8192 else 4, min(1024, triton.next_power_of_2(k)), 4, 3)


def gemv(
    x: torch.Tensor,  # (1, K), contiguous
    weight: torch.Tensor,  # (N, K), rows contiguous
    bias: torch.Tensor | None = None,  # (N,)
    config: GemvConfig | None = None,
) -> torch.Tensor:  # (1, N) in x's dtype
    """`x @ weight.T + bias` for one row (see the module doc); float32 accumulation."""
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"x must be one contiguous row (1, K), got {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be (N, {x.shape[1]}) with contiguous rows")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be ({n},)")
    cfg = config or default_config(n, k)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, bias if bias is not None else x, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` should run a linear layer on `x` in place of cuBLAS: one row on CUDA in
    half precision, and a weight of at most MAX_WEIGHT_ELEMENTS with contiguous rows."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.is_contiguous()
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.stride(1) == 1
        and weight.numel() <= MAX_WEIGHT_ELEMENTS
    )


def gemv_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-torch oracle of `gemv`: the product in float32, rounded to x's dtype."""
    b = bias.float() if bias is not None else None
    return torch.nn.functional.linear(x.float(), weight.float(), b).to(x.dtype)
