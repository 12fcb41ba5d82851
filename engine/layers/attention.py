"""One layer's attention over its paged KV cache, by the backend its kernels choose."""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import (
    AttentionBackend,
    AttentionMetadata,
    Rotation,
    TorchPagedAttention,
    TritonPagedAttention,
)
from engine.layers.kernels import Kernels


class Attention(nn.Module):
    """Causal grouped-query attention of one layer (optionally sliding-window): rotates q and k,
    stores k and v in the layer's cache, attends. The backend is `TritonPagedAttention` on the
    Triton path, else `TorchPagedAttention` (`engine.attention`)."""

    def __init__(self, head_dim: int, sliding_window: int | None, kernels: Kernels) -> None:
        super().__init__()
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.backend: AttentionBackend = (
            TritonPagedAttention() if kernels.triton else TorchPagedAttention()
        )

    def forward(
        self,
        q: torch.Tensor,  # (T, H, D)
        k: torch.Tensor,  # (T, Hkv, D)
        v: torch.Tensor,  # (T, Hkv, D)
        rope: Rotation,
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # (T, H, D)
        # The backend rotates q and k (the Triton one with the KV store).
        return self.backend.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window, rope)

    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # (T, H, D) from rotated q (T, H, D)
        """`forward` for a caller that has already stored the step's rotated k and v (the
        fused one-token projection, `QKVLinear.rotate_and_store`): Triton path only."""
        assert isinstance(self.backend, TritonPagedAttention)
        return self.backend.attend(q, kv_cache, meta, self.scale, self.sliding_window)
