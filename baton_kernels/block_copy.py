"""Gather and scatter whole KV-cache blocks, for moving KV between workers (kv_transfer).

KV cache of one layer (engine.attention's layout)::

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)   0 = keys, 1 = values

`gather_blocks` packs the chosen blocks into one contiguous `(2, n, block_size, Hkv, D)` buffer
(ready for one send); `scatter_blocks` writes such a buffer back into chosen blocks;
`scatter_blocks_layers` does it for several layers (separate cache tensors) in one launch, with
the caches named by a device table of their addresses (`layer_pointers`), from one packed buffer
of all those layers or (`scatter_blocks_from_layers`) from a separate packed buffer per layer.
"""

from __future__ import annotations

from collections.abc import Sequence

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


@triton.jit
def _layers_scatter_kernel(
    cache_ptrs,  # int64 (num_layers,): each layer's cache address
    packed_ptr,  # (c, 2, n, block_size, Hkv, D) contiguous; with SRC_TABLE, layer 0's (2, n, ...)
    src_ptrs,  # with SRC_TABLE, int64 (c,): each layer's packed (2, n, ...) address
    ids_ptr,
    first_layer,
    num_ids,
    num_blocks,
    block_numel,
    SRC_TABLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)  # (layer * 2 + kv) * num_ids + i
    chunk = tl.program_id(1).to(tl.int64)
    layer = row // (2 * num_ids)
    kv = ((row // num_ids) % 2).to(tl.int64)
    i = (row % num_ids).to(tl.int64)
    element = tl.pointer_type(packed_ptr.dtype.element_ty)
    cache_ptr = tl.load(cache_ptrs + first_layer + layer).to(element)
    block_id = tl.load(ids_ptr + i).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    cache_at = cache_ptr + (kv * num_blocks + block_id) * block_numel + offs
    if SRC_TABLE:
        src_ptr = tl.load(src_ptrs + layer).to(element)
        packed_at = src_ptr + (row % (2 * num_ids)).to(tl.int64) * block_numel + offs
    else:
        packed_at = packed_ptr + row.to(tl.int64) * block_numel + offs
    tl.store(cache_at, tl.load(packed_at, mask=mask), mask=mask)


def layer_pointers(kv_caches: list[torch.Tensor]) -> torch.Tensor:
    """The caches' addresses as an int64 tensor on their device, for `scatter_blocks_layers`.

    The caches must stay alive (and in place) as long as the table is used."""
    for cache in kv_caches:
        _check(cache, torch.empty(0, dtype=torch.long))
        if cache.shape != kv_caches[0].shape or cache.dtype != kv_caches[0].dtype:
            raise ValueError("every layer's cache must have the same shape and dtype")
    return torch.tensor([c.data_ptr() for c in kv_caches], dtype=torch.int64).to(
        kv_caches[0].device
    )


def scatter_blocks_layers(
    kv_caches: list[torch.Tensor],  # every layer's (2, num_blocks, block_size, Hkv, D) cache
    pointers: torch.Tensor,  # layer_pointers(kv_caches)
    first_layer: int,
    block_ids: torch.Tensor,  # (n,) distinct integer block ids, on the caches' device
    data: torch.Tensor,  # (c, 2, n, block_size, Hkv, D) contiguous: layers first_layer...+c-1
) -> None:
    """`scatter_blocks` for layers `first_layer .. first_layer + c - 1` in one launch."""
    c, n = data.shape[0], block_ids.numel()
    cache = kv_caches[0]
    expected = (2, n, *cache.shape[2:])
    if tuple(data.shape[1:]) != expected or data.dtype != cache.dtype:
        raise ValueError(f"data must be (c, {', '.join(map(str, expected))}) of {cache.dtype}")
    if not data.is_contiguous() or not 0 <= first_layer <= first_layer + c <= len(kv_caches):
        raise ValueError("data must be contiguous and its layers within the caches")
    if n == 0 or c == 0:
        return
    _launch_layers(kv_caches, pointers, first_layer, block_ids, data, None, c)


def scatter_blocks_from_layers(
    kv_caches: list[torch.Tensor],  # every layer's (2, num_blocks, block_size, Hkv, D) cache
    pointers: torch.Tensor,  # layer_pointers(kv_caches)
    first_layer: int,
    block_ids: torch.Tensor,  # (n,) distinct integer block ids, on the caches' device
    layers: Sequence[torch.Tensor],  # c tensors (2, n, block_size, Hkv, D), each contiguous
) -> None:
    """`scatter_blocks_layers` with each layer's packed blocks in a tensor of its own (no
    stacking copy); one launch. The tensors must stay alive until the launch has run."""
    c, n = len(layers), block_ids.numel()
    cache = kv_caches[0]
    expected = (2, n, *cache.shape[2:])
    for t in layers:
        if tuple(t.shape) != expected or t.dtype != cache.dtype or t.device != cache.device:
            raise ValueError(f"each layer must be ({', '.join(map(str, expected))}) of "
                             f"{cache.dtype} on {cache.device}")  # fmt: skip
        if not t.is_contiguous():
            raise ValueError("each layer must be contiguous")
    if not 0 <= first_layer <= first_layer + c <= len(kv_caches):
        raise ValueError("the layers must be within the caches")
    if n == 0 or c == 0:
        return
    table = torch.tensor([t.data_ptr() for t in layers], dtype=torch.int64).pin_memory()
    table = table.to(cache.device, non_blocking=True)  # from pageable memory it would wait
    _launch_layers(kv_caches, pointers, first_layer, block_ids, layers[0], table, c)


def _launch_layers(
    kv_caches: list[torch.Tensor],
    pointers: torch.Tensor,
    first_layer: int,
    block_ids: torch.Tensor,
    packed: torch.Tensor,
    src_table: torch.Tensor | None,
    c: int,
) -> None:
    cache, n = kv_caches[0], block_ids.numel()
    block_numel = cache[0, 0].numel()
    block = min(triton.next_power_of_2(block_numel), 8192)
    grid = (c * 2 * n, triton.cdiv(block_numel, block))
    _layers_scatter_kernel[grid](
        pointers, packed, pointers if src_table is None else src_table, block_ids, first_layer,
        n, cache.shape[1], block_numel, SRC_TABLE=src_table is not None,
        BLOCK=block, num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip


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


def scatter_blocks_layers_ref(
    kv_caches: list[torch.Tensor],
    first_layer: int,
    block_ids: torch.Tensor,
    data: torch.Tensor | Sequence[torch.Tensor],
) -> None:
    """Plain-torch oracle of `scatter_blocks_layers` (`data` packed) and
    `scatter_blocks_from_layers` (`data` a list of layers)."""
    for j, layer in enumerate(data):
        scatter_blocks_ref(kv_caches[first_layer + j], block_ids, layer)
