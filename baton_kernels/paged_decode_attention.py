"""Decode attention over the paged KV cache: one query token per sequence, GQA, split-K.

Flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference"): each sequence's
context is cut into `num_splits` token ranges; one program per (sequence, KV head, split) runs
an online softmax (Milakov & Gimelshein 2018) over its range for the G query heads that share
the KV head, and writes an unnormalized partial output with its running max and sum. A second
kernel merges the splits. With one split the first kernel writes the final output directly.
Ranges are whole tiles of BLOCK_N tokens, so a context shorter than num_splits tiles leaves the
trailing splits empty: they return at once and the merge reads only the ranges that ran (a
CUDA graph fixes the grid for the longest context; a short one costs little more).

KV cache of one layer (engine.attention's layout)::

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)   0 = keys, 1 = values

    block_tables: (S, max_blocks)   row i = sequence i's block ids, in context order
    seq_lens:     (S,)              tokens of context, including the query token itself

Sequence i attends to context positions t < seq_lens[i] (and, with a window W, to
t > seq_lens[i] - 1 - W: W keys including itself, as engine.attention masks it). Table entries
at or past cdiv(seq_lens[i], block_size) are never read, so they may hold anything (-1 or 0
padding both work). Accumulation is float32; inputs float32, float16 or bfloat16.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from baton_kernels.paged_kv import output_for, paged_scores, paged_values
from baton_kernels.pdl import use_pdl

_TOKENS_PER_SPLIT = 256  # at least this much context per split before splitting further
_MAX_SPLITS = 64


@triton.jit
def _context_splits(lens_ptr, seq, window, num_splits, BLOCK_N: tl.constexpr,
                    USE_WINDOW: tl.constexpr):  # fmt: skip
    """(seq_len, start, per_split) of a sequence: the context it attends is [start, seq_len),
    cut into splits of per_split tokens, a whole number of BLOCK_N tiles (trailing splits may
    be empty)."""
    seq_len = tl.load(lens_ptr + seq).to(tl.int32)
    start = seq_len * 0  # a tensor in either branch, as the caller's arithmetic expects
    if USE_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    per_split = tl.cdiv(tl.cdiv(seq_len - start, num_splits), BLOCK_N) * BLOCK_N
    return seq_len, start, per_split


@triton.jit
def _decode_split_kernel(
    q_ptr,
    cache_ptr,
    tables_ptr,
    lens_ptr,
    out_ptr,  # (S, H, D) final output, used when ONE_SPLIT
    acc_ptr,  # (S, H, num_splits, D) float32 partial outputs, unnormalized
    ml_ptr,  # (S, H, num_splits, 2) float32 running max and sum
    stride_qs,
    stride_qh,
    stride_os,
    stride_oh,
    stride_c_kv,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    stride_table,
    num_heads,
    num_splits,
    scale,
    window,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    ONE_SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # baton_kernels.pdl: q and this step's K/V come from the previous kernels
        tl.extra.cuda.gdc_wait()
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len, start, per_split = _context_splits(lens_ptr, seq, window, num_splits, BLOCK_N,
                                                USE_WINDOW)  # fmt: skip
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, seq_len)
    if lo < hi:  # an empty split does nothing: the merge reads only the splits that ran
        _attend_split(
            q_ptr, cache_ptr, tables_ptr, out_ptr, acc_ptr, ml_ptr, seq, kv_head, split, lo, hi,
            stride_qs, stride_qh, stride_os, stride_oh, stride_c_kv, stride_c_block,
            stride_c_tok, stride_c_head, stride_table, num_heads, num_splits, scale,
            GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_SIZE, BLOCK_N, ONE_SPLIT, IEEE, USE_PDL,
        )  # fmt: skip


@triton.jit
def _attend_split(
    q_ptr, cache_ptr, tables_ptr, out_ptr, acc_ptr, ml_ptr, seq, kv_head, split, lo, hi,
    stride_qs, stride_qh, stride_os, stride_oh, stride_c_kv, stride_c_block, stride_c_tok,
    stride_c_head, stride_table, num_heads, num_splits, scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr,
    IEEE: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """The online softmax of one (sequence, KV head) over context positions [lo, hi)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g  # (BLOCK_G,) query heads sharing this KV head
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_D)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    table = tables_ptr + seq * stride_table
    k_base = cache_ptr + kv_head.to(tl.int64) * stride_c_head
    for tile in range(lo, hi, BLOCK_N):
        _, valid, rows, kv_mask, s = paged_scores(
            q, k_base, table, tile, hi, offs_d, d_mask, stride_c_block, stride_c_tok,
            BLOCK_SIZE, BLOCK_N, IEEE,
        )  # fmt: skip
        s = tl.where(valid[None, :], s * scale, float("-inf"))  # (BLOCK_G, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pv = paged_values(p, k_base, stride_c_kv, rows, offs_d, kv_mask, IEEE)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()

    out_mask = g_mask[:, None] & d_mask[None, :]
    if ONE_SPLIT:
        out = acc / l_i[:, None]
        dst = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (seq * num_heads + heads) * num_splits + split  # (BLOCK_G,)
        tl.store(acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(ml_ptr + row * 2, m_i, mask=g_mask)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    acc_ptr,
    ml_ptr,
    lens_ptr,
    stride_os,
    stride_oh,
    num_heads,
    num_splits,
    window,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # baton_kernels.pdl: everything below reads the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    seq_len, start, per_split = _context_splits(lens_ptr, seq, window, num_splits, BLOCK_N,
                                                USE_WINDOW)  # fmt: skip
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < tl.cdiv(seq_len - start, per_split)  # the splits that ran
    row = (seq * num_heads + head) * num_splits + offs_s  # (BLOCK_SPLITS,)
    m = tl.load(ml_ptr + row * 2, mask=s_mask, other=float("-inf"))
    l_split = tl.load(ml_ptr + row * 2 + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp(m - m_max)
    total = tl.sum(l_split * w, axis=0)
    acc = tl.load(
        acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )  # (BLOCK_SPLITS, BLOCK_D)
    out = tl.sum(acc * w[:, None], axis=0) / total
    dst = out_ptr + seq * stride_os + head * stride_oh + offs_d
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def paged_decode_attention(
    q: torch.Tensor,  # (S, H, D), last dim contiguous
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), last dim contiguous
    block_tables: torch.Tensor,  # (S, max_blocks) int32/int64; padding never read
    seq_lens: torch.Tensor,  # (S,) int32/int64 context tokens, each >= 1
    scale: float,
    sliding_window: int | None = None,  # keys visible, including the query's own
    num_splits: int | None = None,  # context splits per sequence; None = pick from the shapes
    out: torch.Tensor | None = None,  # (S, H, D) like q, last dim contiguous; None = a new one
) -> torch.Tensor:  # (S, H, D) in q's dtype: `out`
    """Attention of each sequence's one query token over its paged context (see module doc)."""
    _check_inputs(q, kv_cache, block_tables, seq_lens, sliding_window)
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    out = output_for(out, q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = _pick_num_splits(q, block_tables.shape[1] * block_size, num_kv_heads)
    num_splits = max(1, min(num_splits, _MAX_SPLITS))
    group = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    block_n = 64  # bench: faster than 128 at batch 128 and at batch 1 up to 2k tokens (H200)
    one_split = num_splits == 1
    parts = 1 if one_split else num_splits
    acc = torch.empty(num_seqs, num_heads, parts, head_dim, dtype=torch.float32, device=q.device)
    ml = torch.empty(num_seqs, num_heads, parts, 2, dtype=torch.float32, device=q.device)
    pdl = use_pdl(q)
    num_warps, num_stages = _split_kernel_config(q, num_seqs * num_kv_heads)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, acc, ml,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), num_heads, num_splits, scale,
        sliding_window or 0,
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),  # tl.dot needs M >= 16
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None,
        ONE_SPLIT=one_split,
        IEEE=q.dtype == torch.float32,
        USE_PDL=pdl,
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )  # fmt: skip
    if not one_split:
        _reduce_splits(out, acc, ml, seq_lens, sliding_window, block_n, pdl)
    return out


def _reduce_splits(
    out: torch.Tensor,  # (S, H, D)
    acc: torch.Tensor,  # (S, H, splits, D) float32: each split's weighted sums
    ml: torch.Tensor,  # (S, H, splits, 2) float32: each split's running max and sum
    seq_lens: torch.Tensor,  # (S,)
    sliding_window: int | None,
    block_n: int,
    pdl: bool,
) -> None:
    """Combine the splits' partial results into `out` (the second kernel of a split run)."""
    num_seqs, num_heads, num_splits, head_dim = acc.shape
    _decode_reduce_kernel[(num_seqs, num_heads)](
        out, acc, ml, seq_lens, out.stride(0), out.stride(1), num_heads, num_splits,
        sliding_window or 0,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        BLOCK_N=block_n,
        USE_WINDOW=sliding_window is not None,
        USE_PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )  # fmt: skip


def _check_inputs(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    sliding_window: int | None,
) -> None:
    """ValueError unless the arguments have the shapes, dtypes and layouts the kernels read."""
    num_seqs, num_heads, head_dim = q.shape
    _, _, _, num_kv_heads, cache_dim = kv_cache.shape
    if cache_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError("q (S, H, D) needs the cache's D and H a multiple of its Hkv")
    if q.dtype != kv_cache.dtype:
        raise ValueError(f"q is {q.dtype} but kv_cache is {kv_cache.dtype}")
    if (
        block_tables.dim() != 2
        or block_tables.shape[0] != num_seqs
        or seq_lens.shape != (num_seqs,)
    ):
        raise ValueError("block_tables must be (S, max_blocks) and seq_lens (S,)")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q, kv_cache and block_tables need a contiguous last dimension")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError("sliding_window must be >= 1 (or None)")


def _split_kernel_config(q: torch.Tensor, num_programs: int) -> tuple[int, int]:
    """(num_warps, num_stages) of the split kernel. With at least one (sequence, KV head) per
    SM, two warps and three stages: the smaller programs keep more tiles in flight per SM
    (H200, 1B shape, bf16: batch 128 at 575 tokens 39.2 us against 47.0 with four warps, at
    2k 129 against 163, batch 32 at 1k 24.7 against 25.1). Fewer, split programs keep four
    warps and two stages (batch 1 at 575 tokens: 4.55 us against 4.74)."""
    num_sms = _num_sms(q.device.index if q.device.index is not None else 0)
    return (2, 3) if num_programs >= num_sms else (4, 2)


def _pick_num_splits(q: torch.Tensor, max_context: int, num_kv_heads: int) -> int:
    """Enough splits to fill the GPU four times over at the longest context the table allows,
    but no split under _TOKENS_PER_SPLIT tokens of it.

    Uses only host-side shapes (the table width bounds the context), so it never syncs. A
    shorter context runs fewer splits of at least BLOCK_N tokens; the rest exit at once.
    """
    num_sms = _num_sms(q.device.index if q.device.index is not None else 0)
    programs = q.shape[0] * num_kv_heads
    wanted = triton.cdiv(4 * num_sms, programs)
    by_length = triton.cdiv(max_context, _TOKENS_PER_SPLIT)
    return max(1, min(wanted, by_length, _MAX_SPLITS))


@cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def paged_decode_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain-torch oracle of `paged_decode_attention`, one sequence at a time in float32.

    `num_splits` is accepted for signature parity and ignored: splitting does not change math.
    """
    num_heads = q.shape[1]
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens.tolist()):
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len].float()  # (L, Hkv, D)
        values = kv_cache[1, blocks].flatten(0, 1)[:seq_len].float()
        if sliding_window is not None:
            keys, values = keys[-sliding_window:], values[-sliding_window:]
        keys = keys.repeat_interleave(group, dim=1)  # (L, H, D)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[i].float(), keys) * scale  # (H, L)
        probs = scores.softmax(dim=-1)
        out[i] = torch.einsum("hl,lhd->hd", probs, values).to(q.dtype)
    return out
