"""Gathering the KV of some blocks out of a paged cache, and scattering it into another.

Every cache is one tensor per layer, in `engine.attention`'s layout; blocks are indexed along
dim 1::

    kv_caches[layer]: (2, num_blocks, block_size, num_kv_heads, head_dim)
    gathered layer:   (2, len(block_ids), block_size, num_kv_heads, head_dim), contiguous
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch

from kv_transfer.base import KVLayerSource, KVTransferError

BlockIds = Sequence[int] | torch.Tensor


def block_index(block_ids: BlockIds, device: torch.device | str = "cpu") -> torch.Tensor:
    """`block_ids` as an int64 index tensor of shape (n,) on `device`. To a GPU, the copy goes
    through pinned memory, queued on the current stream: from pageable memory CUDA would first
    wait for everything queued on that stream (a whole engine step, say)."""
    device = torch.device(device)
    if isinstance(block_ids, torch.Tensor) or device.type != "cuda":
        return torch.as_tensor(block_ids, dtype=torch.long, device=device).reshape(-1)
    host = torch.tensor(list(block_ids), dtype=torch.long).pin_memory()
    return host.to(device, non_blocking=True)


class GatheredBlocks:
    """A lazy `KVLayerSource` over `kv_caches`: layer `i` is copied out only when asked for."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], block_ids: BlockIds) -> None:
        self._kv_caches = list(kv_caches)
        device = self._kv_caches[0].device if self._kv_caches else "cpu"
        self._index = block_index(block_ids, device)

    @property
    def num_layers(self) -> int:
        """Number of layers in the cache."""
        return len(self._kv_caches)

    def layer(self, i: int) -> torch.Tensor:
        """Layer `i`'s KV of the gathered blocks: a new contiguous (2, n, bs, Hkv, D) tensor."""
        return self._kv_caches[i].index_select(1, self._index)


def gather_blocks(kv_caches: Sequence[torch.Tensor], block_ids: BlockIds) -> KVLayerSource:
    """A per-layer source of the KV at `block_ids` (in that order), copied on demand."""
    return GatheredBlocks(kv_caches, block_ids)


def scatter_layer(cache: torch.Tensor, block_ids: BlockIds, data: torch.Tensor) -> None:
    """Write `data` (2, n, bs, Hkv, D) into one layer's `cache` at `block_ids`: one bulk copy
    (the Triton block-copy kernel on a GPU, `index_copy_` elsewhere).

    `block_ids` must be distinct; `data` is moved to the cache's device if needed.
    """
    index = block_ids if isinstance(block_ids, torch.Tensor) else block_index(block_ids)
    index, data = index.to(cache.device), data.to(cache.device)
    if cache.is_cuda and cache.is_contiguous() and data.is_contiguous() and _has_triton():
        from baton_kernels.block_copy import scatter_blocks

        with torch.cuda.device(cache.device):  # Triton launches on the current device
            scatter_blocks(cache, index, data)
    else:
        cache.index_copy_(1, index, data)


class LayerScatter:
    """Writes several layers' packed blocks into `kv_caches` at once (the receiving end of a
    transfer): one Triton launch for a run of layers on a GPU, `scatter_layer` per layer
    elsewhere. Keeps a device table of the caches' addresses, so the caches must stay put."""

    def __init__(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self.kv_caches = list(kv_caches)
        first = self.kv_caches[0]
        self._pointers: torch.Tensor | None = None
        self._fused = (
            first.is_cuda
            and _has_triton()
            and all(
                c.is_contiguous() and c.shape == first.shape and c.dtype == first.dtype
                for c in self.kv_caches
            )
        )

    def __call__(self, first_layer: int, block_ids: torch.Tensor, data: torch.Tensor) -> None:
        """Write `data` (c, 2, n, bs, Hkv, D), contiguous, into layers `first_layer ..
        first_layer + c - 1` at `block_ids` (n,), on the current stream."""
        if not self._fused or not data.is_contiguous():
            for j, layer in enumerate(data):
                scatter_layer(self.kv_caches[first_layer + j], block_ids, layer)
            return
        from baton_kernels.block_copy import scatter_blocks_layers

        device = self.kv_caches[0].device
        with torch.cuda.device(device):  # Triton launches on the current device
            scatter_blocks_layers(self.kv_caches, self._table(), first_layer, block_ids, data)

    def each(
        self, first_layer: int, block_ids: torch.Tensor, layers: Sequence[torch.Tensor]
    ) -> None:
        """`self(first_layer, block_ids, stacked layers)` without stacking them: `layers` are
        c tensors (2, n, bs, Hkv, D), each contiguous, kept alive until the work ran."""
        if not self._fused:
            for j, layer in enumerate(layers):
                scatter_layer(self.kv_caches[first_layer + j], block_ids, layer)
            return
        from baton_kernels.block_copy import scatter_blocks_from_layers

        with torch.cuda.device(self.kv_caches[0].device):
            scatter_blocks_from_layers(
                self.kv_caches, self._table(), first_layer, block_ids, list(layers)
            )

    def _table(self) -> torch.Tensor:
        from baton_kernels.block_copy import layer_pointers

        if self._pointers is None:
            self._pointers = layer_pointers(self.kv_caches)
        return self._pointers


@cache
def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def check_layer(
    transfer_id: str,
    i: int,
    cache: torch.Tensor,
    shape: Sequence[int],
    dtype: torch.dtype,
    num_blocks: int,
) -> None:
    """`KVTransferError` unless a layer of `shape`/`dtype` fits layer `i`'s `cache`.

    `num_blocks` is the number of reserved destination blocks: the layer must be
    (2, num_blocks, *cache.shape[2:]) in the cache's dtype.
    """
    if dtype != cache.dtype:
        raise KVTransferError(
            f"transfer {transfer_id!r}, layer {i}: sender dtype {dtype}, receiver {cache.dtype}"
        )
    expected = (2, num_blocks, *cache.shape[2:])
    if tuple(shape) != expected:
        raise KVTransferError(
            f"transfer {transfer_id!r}, layer {i}: sender shape {tuple(shape)}, receiver expects "
            f"{expected} (2, reserved blocks, block_size, num_kv_heads, head_dim)"
        )
