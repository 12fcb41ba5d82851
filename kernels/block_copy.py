"""Gather and scatter whole KV-cache blocks, for moving KV between workers (kv_transfer).

KV cache of one layer (engine.attention's layout)::

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)   0 = keys, 1 = values

`gather_blocks` packs the chosen blocks into one contiguous `(2, n, block_size, Hkv, D)` buffer
(ready for one send); `scatter_blocks` writes such a buffer back into chosen blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COPY_BLOCK = 2048  # elements copied per program


@triton.jit
def _block_copy_kernel(
    cache_ptr,
    packed_ptr,
    ids_ptr,
    num_ids,
    num_blocks,
    block_numel,
    TO_CACHE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # kv * num_ids + i
    chunk = tl.program_id(1).to(tl.int64)
    kv = (row // num_ids).to(tl.int64)
    i = (row % num_ids).to(tl.int64)
    block_id = tl.load(ids_ptr + i).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    cache_at = cache_ptr + (kv * num_blocks + block_id) * block_numel + offs
    packed_at = packed_ptr + (kv * num_ids + i) * block_numel + offs
    if TO_CACHE:
        tl.store(cache_at, tl.load(packed_at, mask=mask), mask=mask)
    else:
        tl.store(packed_at, tl.load(cache_at, mask=mask), mask=mask)


def _check(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be a contiguous (2, num_blocks, block_size, Hkv, D)")
    if block_ids.dim() != 1:
        raise ValueError("block_ids must be a 1-D tensor of block ids")


def _launch(kv_cache: torch.Tensor, packed: torch.Tensor, block_ids: torch.Tensor, to_cache: bool):
    n = block_ids.numel()
    if n == 0:
        return
    block_numel = kv_cache[0, 0].numel()
    grid = (2 * n, triton.cdiv(block_numel, _COPY_BLOCK))
    _block_copy_kernel[grid](
        kv_cache, packed, block_ids, n, kv_cache.shape[1], block_numel,
        TO_CACHE=to_cache, BLOCK=_COPY_BLOCK, num_warps=4,
    )  # fmt: skip


def gather_blocks(
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), contiguous
    block_ids: torch.Tensor,  # (n,) integer block ids, on kv_cache's device
) -> torch.Tensor:  # (2, n, block_size, Hkv, D), contiguous
    """Copy blocks `block_ids` (keys and values) out of the cache into a new packed tensor."""
    _check(kv_cache, block_ids)
    packed = kv_cache.new_empty((2, block_ids.numel(), *kv_cache.shape[2:]))
    _launch(kv_cache, packed, block_ids, to_cache=False)
    return packed


def scatter_blocks(
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), contiguous; written in place
    block_ids: torch.Tensor,  # (n,) distinct integer block ids
    data: torch.Tensor,  # (2, n, block_size, Hkv, D), same dtype as kv_cache
) -> None:
    """Write packed blocks `data[:, i]` into cache block `block_ids[i]` (keys and values)."""
    _check(kv_cache, block_ids)
    expected = (2, block_ids.numel(), *kv_cache.shape[2:])
    if tuple(data.shape) != expected or data.dtype != kv_cache.dtype:
        raise ValueError(f"data must be {expected} of dtype {kv_cache.dtype}")
    _launch(kv_cache, data.contiguous(), block_ids, to_cache=True)


def gather_blocks_ref(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Plain-torch oracle of `gather_blocks`."""
    return kv_cache.index_select(1, block_ids.long())


def scatter_blocks_ref(kv_cache: torch.Tensor, block_ids: torch.Tensor, data: torch.Tensor) -> None:
    """Plain-torch oracle of `scatter_blocks`."""
    kv_cache.index_copy_(1, block_ids.long(), data)
