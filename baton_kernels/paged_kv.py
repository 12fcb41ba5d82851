"""One tile of context from the paged KV cache, as both attention kernels read it.

KV cache of one layer (engine.attention's layout)::

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)   0 = keys, 1 = values

`k_base` points at one KV head's keys (`cache + head * stride_c_head`); its values are
`stride_c_kv` further. `table` is one sequence's row of block ids.

`output_for` checks (or makes) the output tensor both attention wrappers take.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def paged_scores(
    q, k_base, table, tile, hi, offs_d, d_mask, stride_c_block, stride_c_tok,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """q @ K^T over context positions [tile, tile + BLOCK_N) (those at or past `hi` read as
    zero keys), in float32: (positions, valid, cache rows, K/V mask, scores)."""
    toks = tile + tl.arange(0, BLOCK_N)  # (BLOCK_N,) context positions
    valid = toks < hi
    block = tl.load(table + toks // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    rows = block * stride_c_block + (toks % BLOCK_SIZE).to(tl.int64) * stride_c_tok
    kv_mask = valid[:, None] & d_mask[None, :]
    k = tl.load(k_base + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    if IEEE:  # noqa: SIM108 (a static branch: input_precision must be a constant)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return toks, valid, rows, kv_mask, s


@triton.jit
def paged_values(p, k_base, stride_c_kv, rows, offs_d, kv_mask, IEEE: tl.constexpr):
    """p @ V over the cache rows `paged_scores` found, in float32 (p is float32)."""
    v = tl.load(k_base + stride_c_kv + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        return tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return tl.dot(p.to(v.dtype), v)


def output_for(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    """`out` checked to take attention of `q` (same shape, dtype and device, rows of
    contiguous heads), or a new tensor like `q` when None."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must be like q: {tuple(q.shape)} {q.dtype} on {q.device}; got "
            f"{tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if out.stride(-1) != 1:
        raise ValueError("out needs a contiguous last dimension")
    return out
