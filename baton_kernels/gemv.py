"""The matrix-vector product of a one-row linear layer (batch-1 decode).

At batch 1 a decode step is a chain of matrix-vector products: the weights stream through once
and the time is bytes / bandwidth, so what matters is keeping enough loads in flight on every
SM. For the smaller matrices of a 1B model (8-32 MiB: q/k/v, o and down projections) cuBLAS
picks tiles that give each program too much of the matrix and reaches 1.4-2.4 TB/s on an H200;
this kernel gives each program two to four output columns, streams their weight rows along K in
long steps into a float32 accumulator of (BLOCK_N, BLOCK_K) partial products, and reduces once
at the end (`experiments.gpu_gemv` measures both).

    y = x @ weight.T (+ bias)          x: (1, K)   weight: (N, K)   y: (1, N)

`gemv_qkv_rope` is the same product for the fused q/k/v projection with the rotary embedding
and the KV store in its epilogue, `gemv_gate_up_silu` for the fused gate/up projection with
SwiGLU's activation in its epilogue (one kernel instead of two per layer, each). All load their
first weight tile before waiting on the previous kernel (`baton_kernels.pdl`).

The RMSNorm before a projection and the residual add after one also run inside these kernels,
so that a batch-1 decode layer launches no norm or add kernel (`LlamaDecoderLayer.
forward_folded`). The add is an epilogue (`residual=`). The norm (`norm_eps=`) costs no extra
bytes: its weight is folded into the projection's weight at load (`fold_norm_weight`), and its
scale rsqrt(mean(x^2) + eps) is one multiply of the float32 sums, the sum of squares taken from
the x tiles every program loads anyway. An earlier fusion that re-read the residual and the
norm weight in every program (as many L2 bytes as its own weights) ran slower than the
separate kernels, and so did fusing the SwiGLU activation before the down projection.
Which of these the engine uses is its choice (`engine.config.KernelConfig`: `fuse_gate_up`,
`fold_norms`), made once in its layers (`engine.layers`); these functions read no switch.

Measured and dropped (experiments.gpu_gemv, H200): for more than one row cuBLAS's tiles were faster
than this kernel's tensor-core variant, and for matrices over 32 MiB cuBLAS is as fast
(lm_head; the gate/up projection goes through `gemv_gate_up_silu`, with its activation: 16.7 us
a layer against 20.1 for cuBLAS's GEMM and `silu_mul` on an H200).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from baton_kernels.pdl import use_pdl

MAX_WEIGHT_ELEMENTS = 1 << 24  # larger matrices (over 32 MiB in bf16) stay with cuBLAS


class GemvConfig(NamedTuple):
    """One launch configuration: output columns and K elements per program, warps, stages, and
    a cap on registers per thread (0: the compiler's choice)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    max_registers: int = 0


# Register caps that keep more programs resident (more weight bytes in flight), both without
# spills (ptxas). The norm's reduction takes gemv_qkv_rope from 40 to 48 registers a thread, 10
# programs of 4 warps an SM instead of 12; gemv_gate_up_silu with the norm at 72 fits 7, at 64
# fits 8 (without the norm a cap of 64 spills, so it applies with the norm only). H200,
# batch-1 graph of the 1B shape: 0.807 ms with neither cap, 0.798 with the q/k/v one, 0.792
# with both (0.831 with separate norm kernels).
QKV_ROPE_MAX_REGISTERS = 40
GATE_UP_MAX_REGISTERS = 64


@triton.jit
def _dot_rows(
    x_ptr, w_rows, n_mask, K, eps, BLOCK_K: tl.constexpr, NORM: tl.constexpr, USE_PDL: tl.constexpr
):
    """(BLOCK_N,) float32 dot products of x (K,) with the program's weight rows `w_rows`
    (BLOCK_N, 1 pointers). The first weight tile is loaded before the PDL wait: the weights
    never depend on the previous kernel, so they stream while it drains.

    With NORM, x is RMS-normalised on the way: the products are scaled by rsqrt(mean(x^2) +
    eps), the sum of squares taken from the same x tiles (every program reads all of x). The
    norm's weight is not applied: `fold_norm_weight` has multiplied it into the rows."""
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    acc = x[None, :] * w.to(tl.float32)  # (BLOCK_N, BLOCK_K) partial products
    # NORM: x's sum of squares, reduced tile by tile (a vector kept to the end would hold
    # BLOCK_K / threads more registers per thread and cost the GEMV resident programs)
    squares = tl.sum(x * x, axis=0)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += x[None, :] * w.to(tl.float32)
        if NORM:
            squares += tl.sum(x * x, axis=0)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    y = tl.sum(acc, axis=1)
    if NORM:
        y = y * tl.rsqrt(squares / K + eps)
    return y


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    eps,
    res_ptr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # (BLOCK_N, 1)
    y = _dot_rows(x_ptr, w_rows, n_mask, K, eps, BLOCK_K, NORM, USE_PDL)  # (BLOCK_N,)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the layer's output rounded, then added to the stream and rounded again
        r = tl.load(res_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + r
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_qkv_rope_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    q_ptr,  # (H, D) rotated queries out
    pos_ptr,
    cos_sin_ptr,
    kv_cache_ptr,
    slot_ptr,
    K,
    stride_wn,
    eps,
    stride_cs_p,
    stride_cs_cs,
    stride_c_kv,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    block_size,
    num_heads,
    num_kv_heads,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Program p takes PAIRS rotary pairs (d, d + D/2) of one head of the fused q|k|v output,
    # rows interleaved as [d0, d0 + D/2, d1, d1 + D/2, ...]: a (2 * PAIRS) row GEMV tile.
    half: tl.constexpr = HEAD_DIM // 2
    per_head: tl.constexpr = half // PAIRS
    pid = tl.program_id(0)
    head = pid // per_head  # 0..H-1 queries, then Hkv keys, then Hkv values
    r = tl.arange(0, 2 * PAIRS)
    dims = (pid % per_head) * PAIRS + r // 2 + (r % 2) * half  # (2 * PAIRS,) within the head
    rows = head * HEAD_DIM + dims
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    y = _dot_rows(x_ptr, w_rows, rows >= 0, K, eps, BLOCK_K, NORM, USE_PDL)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)
    y = y.to(q_ptr.dtype.element_ty)  # the projection's output, rounded as the GEMV rounds it
    y1, y2 = tl.split(tl.reshape(y, (PAIRS, 2)))  # (PAIRS,) each: dims d and d + D/2
    d = (pid % per_head) * PAIRS + tl.arange(0, PAIRS)
    if head < num_heads + num_kv_heads:  # q or k: rotate as baton_kernels.rotary does
        pos = tl.load(pos_ptr).to(tl.int64)
        cos_ptr = cos_sin_ptr + pos * stride_cs_p + d
        cos1 = tl.load(cos_ptr).to(tl.float32)
        cos2 = tl.load(cos_ptr + half).to(tl.float32)
        sin1 = tl.load(cos_ptr + stride_cs_cs).to(tl.float32)
        sin2 = tl.load(cos_ptr + stride_cs_cs + half).to(tl.float32)
        a1 = y1.to(tl.float32)
        a2 = y2.to(tl.float32)
        out1 = (a1 * cos1).to(y.dtype).to(tl.float32) + (-a2 * sin1).to(y.dtype).to(tl.float32)
        out2 = (a2 * cos2).to(y.dtype).to(tl.float32) + (a1 * sin2).to(y.dtype).to(tl.float32)
        y1 = out1.to(y.dtype)
        y2 = out2.to(y.dtype)
    if head < num_heads:
        dst = q_ptr + head * HEAD_DIM + d
        tl.store(dst, y1)
        tl.store(dst + half, y2)
    else:
        slot = tl.load(slot_ptr).to(tl.int64)
        if slot >= 0:  # a padding row (negative slot) stores nothing
            kv = (head - num_heads) // num_kv_heads  # 0 keys, 1 values
            kv_head = (head - num_heads) % num_kv_heads
            dst = (
                kv_cache_ptr
                + kv * stride_c_kv
                + (slot // block_size) * stride_c_block
                + (slot % block_size) * stride_c_tok
                + kv_head * stride_c_head
                + d
            )
            tl.store(dst, y1.to(kv_cache_ptr.dtype.element_ty))
            tl.store(dst + half, y2.to(kv_cache_ptr.dtype.element_ty))


@triton.jit
def _gemv_gate_up_silu_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,  # (I,) silu(gate) * up
    inter,  # I: the gate rows are weight[:I], the up rows weight[I:]
    K,
    stride_wn,
    eps,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    PAIRS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Program p takes output columns [p * PAIRS, (p + 1) * PAIRS): their gate and up rows,
    # interleaved [g0, u0, g1, u1, ...] as one (2 * PAIRS)-row GEMV tile.
    pid = tl.program_id(0)
    r = tl.arange(0, 2 * PAIRS)
    cols = pid * PAIRS + r // 2
    rows = cols + (r % 2) * inter
    col_mask = cols < inter
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    y = _dot_rows(x_ptr, w_rows, col_mask, K, eps, BLOCK_K, NORM, USE_PDL)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=col_mask, other=0.0).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)  # the projection's output, rounded as the GEMV rounds it
    gate, up = tl.split(tl.reshape(y, (PAIRS, 2)))
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # as baton_kernels.silu_mul rounds it
    out = act.to(tl.float32) * up.to(tl.float32)
    c = pid * PAIRS + tl.arange(0, PAIRS)
    tl.store(y_ptr + c, out.to(y_ptr.dtype.element_ty), mask=c < inter)


def default_config(n: int, k: int) -> GemvConfig:
    """The launch configuration for an (N, K) weight, from `experiments.gpu_gemv --sweep` (H200):
    two output columns per program for up to 8k columns, four beyond (one to four thousand
    programs), K in steps of 1,024."""
    return GemvConfig(2 if n <= 8192 else 4, min(1024, triton.next_power_of_2(k)), 4, 3)


def gemv(
    x: torch.Tensor,  # (1, K), contiguous
    weight: torch.Tensor,  # (N, K), rows contiguous
    bias: torch.Tensor | None = None,  # (N,)
    config: GemvConfig | None = None,
    *,
    residual: torch.Tensor | None = None,  # (1, N), contiguous
    norm_eps: float | None = None,
) -> torch.Tensor:  # (1, N) in x's dtype
    """`x @ weight.T + bias` for one row (see the module doc); float32 accumulation.

    With `residual`, returns `residual + (x @ weight.T + bias)`, the product rounded to x's dtype
    before the add as a separate add would round it. With `norm_eps`, x is RMS-normalised first
    (`fold_norm_weight`: the norm's weight must already be in `weight`)."""
    n, k = _check_row(x, weight, bias)
    if residual is not None and (residual.shape != (1, n) or not residual.is_contiguous()
                                 or residual.dtype != x.dtype):  # fmt: skip
        raise ValueError(f"residual must be one contiguous row (1, {n}) of x's dtype")
    cfg = config or default_config(n, k)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _launch(_gemv_kernel, triton.cdiv(n, cfg.block_n), x, weight, bias, y, n, cfg, norm_eps,
            res_ptr=residual if residual is not None else x, HAS_RESIDUAL=residual is not None,
            BLOCK_N=cfg.block_n)  # fmt: skip
    return y


def _check_row(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int]:
    """(N, K) of a one-row product's operands, or a ValueError naming the one that is wrong."""
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"x must be one contiguous row (1, K), got {tuple(x.shape)}")
    n, k = weight.shape
    if x.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"weight must be (N, {x.shape[1]}) with contiguous rows")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be ({n},)")
    return n, k


def _launch(
    kernel: Any,
    programs: int,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    n: int,
    cfg: GemvConfig,
    norm_eps: float | None,
    **meta: Any,
) -> None:
    """Launch a GEMV kernel of the (x, w, b, y, N, K, stride_wn, eps) signature with `cfg`."""
    pdl = use_pdl(x)
    kernel[(programs,)](
        x, weight, bias if bias is not None else x, y, n, x.shape[1], weight.stride(0),
        0.0 if norm_eps is None else norm_eps,
        HAS_BIAS=bias is not None,
        NORM=norm_eps is not None,
        BLOCK_K=cfg.block_k,
        USE_PDL=pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        launch_pdl=pdl,
        **({"maxnreg": cfg.max_registers} if cfg.max_registers else {}),
        **meta,
    )  # fmt: skip


def gemv_qkv_rope(
    x: torch.Tensor,  # (1, K) one token's hidden state, contiguous
    weight: torch.Tensor,  # ((H + 2 * Hkv) * D, K): the fused q|k|v projection
    bias: torch.Tensor | None,  # ((H + 2 * Hkv) * D,)
    num_heads: int,
    num_kv_heads: int,
    position: torch.Tensor,  # (1,) the token's position
    cos_sin_cache: torch.Tensor,  # (max_positions, 2, D): RotaryEmbedding.cos_sin
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), last dim contiguous
    slot_mapping: torch.Tensor,  # (1,) the token's cache slot; < 0 = do not store
    norm_eps: float | None = None,  # RMS-normalise x first, as `gemv` does
) -> torch.Tensor:  # (1, H, D) rotated queries
    """One token's q/k/v projection, rotary embedding and KV store in one kernel: `gemv`, then
    `baton_kernels.rotary.rotary_write_kv` (the same GEMV tile of two rows per program, the two
    rows a rotary pair; the same values, and rotated q and k that differ from the two kernels'
    by a last-bit rounding at most). Returns the rotated queries; the rotated key and the value
    go to the token's slot in `kv_cache`."""
    head_dim = kv_cache.shape[-1]
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"x must be one contiguous row (1, K), got {tuple(x.shape)}")
    if weight.shape != (rows, x.shape[1]) or weight.stride(1) != 1:
        raise ValueError(f"weight must be ({rows}, {x.shape[1]}) with contiguous rows")
    if kv_cache.shape[3] != num_kv_heads or kv_cache.stride(-1) != 1 or head_dim % 2:
        raise ValueError("kv_cache must be (2, N, B, Hkv, D), last dim contiguous, D even")
    if cos_sin_cache.shape[1:] != (2, head_dim) or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"cos_sin_cache must be (P, 2, {head_dim}), last dim contiguous")
    if position.numel() != 1 or slot_mapping.numel() != 1:
        raise ValueError("position and slot_mapping hold one entry: the one token's")
    q = torch.empty(1, num_heads, head_dim, dtype=x.dtype, device=x.device)
    pairs = 1  # two rows per program, as default_config gives these shapes
    pdl = use_pdl(x)
    _gemv_qkv_rope_kernel[(rows // (2 * pairs),)](
        x, weight, bias if bias is not None else x, q, position, cos_sin_cache, kv_cache,
        slot_mapping, x.shape[1], weight.stride(0), 0.0 if norm_eps is None else norm_eps,
        cos_sin_cache.stride(0),
        cos_sin_cache.stride(1), *kv_cache.stride()[:4], kv_cache.shape[2],
        num_heads, num_kv_heads,
        HAS_BIAS=bias is not None,
        NORM=norm_eps is not None,
        HEAD_DIM=head_dim,
        PAIRS=pairs,
        BLOCK_K=default_config(rows, x.shape[1]).block_k,
        USE_PDL=pdl,
        num_warps=4,
        num_stages=3,
        launch_pdl=pdl,
        maxnreg=QKV_ROPE_MAX_REGISTERS,
    )  # fmt: skip
    return q


def gemv_gate_up_silu(
    x: torch.Tensor,  # (1, K), contiguous
    weight: torch.Tensor,  # (2 * I, K): the fused [gate | up] projection, rows contiguous
    bias: torch.Tensor | None = None,  # (2 * I,)
    config: GemvConfig | None = None,  # block_n = 2 * output columns per program
    *,
    norm_eps: float | None = None,  # RMS-normalise x first, as `gemv` does
) -> torch.Tensor:  # (1, I)
    """SwiGLU's first half for one row: `silu(gate) * up` of `x @ weight.T` in one kernel (the
    GEMV and `baton_kernels.silu_mul` with their roundings), instead of a GEMM and a launch."""
    n, k = _check_row(x, weight, bias)
    if n % 2:
        raise ValueError(f"weight must have an even number of rows (2 * I), got {n}")
    # experiments.gpu_gemv, H200: one column (two rows) per program and K in one step of up to 2,048
    cap = GATE_UP_MAX_REGISTERS if norm_eps is not None else 0  # without the norm it spills
    cfg = config or GemvConfig(2, min(2048, triton.next_power_of_2(k)), 4, 3, cap)
    pairs, inter = max(1, cfg.block_n // 2), n // 2
    y = torch.empty(1, inter, dtype=x.dtype, device=x.device)
    _launch(_gemv_gate_up_silu_kernel, triton.cdiv(inter, pairs), x, weight, bias, y, inter, cfg,
            norm_eps, PAIRS=pairs)  # fmt: skip
    return y


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` should run a linear layer on `x` in place of cuBLAS: one row on CUDA in
    half precision, and a weight of at most MAX_WEIGHT_ELEMENTS with contiguous rows."""
    return one_row(x, weight) and weight.numel() <= MAX_WEIGHT_ELEMENTS


def one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether these kernels can take `x @ weight.T`: one contiguous row in half precision on
    CUDA, the weight in x's dtype with contiguous rows (any size)."""
    return (
        x.is_cuda
        and x.dim() == 2
        and x.shape[0] == 1
        and x.is_contiguous()
        and x.dtype in (torch.float16, torch.bfloat16)
        and weight.dtype == x.dtype
        and weight.stride(1) == 1
    )


def fold_norm_weight(weight: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """`weight * norm_weight` over K, rounded once to weight's dtype: the projection that reads
    the unweighted norm `n(x)` gives what `weight` gives on `norm_weight * n(x)`, so a GEMV with
    `norm_eps` can apply the whole RMSNorm as one scale of its float32 sums."""
    k = weight.shape[1]
    if norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must be ({k},), got {tuple(norm_weight.shape)}")
    return (weight.float() * norm_weight.float()).to(weight.dtype)


def gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_eps: float | None = None,
) -> torch.Tensor:
    """Plain-torch oracle of `gemv`: the product in float32, rounded to x's dtype."""
    b = bias.float() if bias is not None else None
    h = x.float()
    if norm_eps is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm_eps)
    y = torch.nn.functional.linear(h, weight.float(), b).to(x.dtype)
    return y if residual is None else y + residual
