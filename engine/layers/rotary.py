"""Rotary position embedding (RoPE, Su et al. 2021, "RoFormer") with a precomputed cos/sin cache.

Follows transformers' Llama convention: the head dimension is split in two halves that rotate
together (`rotate_half`), not interleaved pairs. Supported frequency scalings: none ("default"),
"linear" (position interpolation) and "llama3" (Llama 3.1's wavelength-dependent smoothing).
The cache is computed once for every position up to `max_positions`, so a step only indexes it.
`RotaryEmbedding.at` gives a step's rotation (`Rope`), shared by every layer: on the Triton path
a kernel rotates q and k in place (`baton_kernels.rotary`), else the step's cos/sin rows are
looked up once and applied with torch ops.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from engine.layers.kernels import TORCH, Kernels


def rope_inv_freq(
    head_dim: int, theta: float, scaling: dict[str, Any] | None
) -> torch.Tensor:  # (head_dim // 2,) float32, radians per position
    """Inverse frequencies of each rotated pair, computed as transformers does (float32)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    assert scaling is not None
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: keep short wavelengths, divide long ones by `factor`, blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]  # tokens
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): [x1, x2] -> [-x2, x1] over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin cache for positions [0, max_positions) and the rotation applied to q and k."""

    cos_sin: torch.Tensor  # (max_positions, 2, head_dim) in the model dtype

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        dtype: torch.dtype,
        kernels: Kernels = TORCH,
    ) -> None:
        super().__init__()
        self._rope: type[Rope] = TritonRope if kernels.triton else TorchRope
        inv_freq = rope_inv_freq(head_dim, theta, scaling)  # (D/2,)
        positions = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        # Cast after cos/sin, as transformers does, so low-precision models round identically.
        cos_sin = torch.stack((emb.cos(), emb.sin()), dim=1).to(dtype)  # (P, 2, D)
        self.register_buffer("cos_sin", cos_sin, persistent=False)

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """(T,) int64 positions -> (T, 2, 1, D) cos/sin, broadcastable over heads."""
        return self.cos_sin[positions].unsqueeze(2)

    def at(self, positions: torch.Tensor) -> Rope:
        """The rotation of one step's (T,) int64 positions, shared by every layer."""
        return self._rope(self, positions)


class Rope(ABC):
    """One step's rotation (an `engine.attention.Rotation`): its positions and the cos/sin
    cache, applied to q and k by the subclass the `RotaryEmbedding` chose."""

    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor) -> None:
        self.cos_sin_cache = rotary.cos_sin  # (max_positions, 2, D)
        self.positions = positions  # (T,)

    @abstractmethod
    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (T, H, D), k (T, Hkv, D) -> rotated (in place on the Triton path)."""


class TorchRope(Rope):
    """The torch reference: the step's cos/sin rows looked up once, applied with torch ops."""

    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor) -> None:
        super().__init__(rotary, positions)
        self.cos_sin = rotary.lookup(positions)  # (T, 2, 1, D)

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(q, self.cos_sin), apply_rotary(k, self.cos_sin)


class TritonRope(Rope):
    """The Triton path: `baton_kernels.rotary` rotates q and k in place from the cos/sin cache."""

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from baton_kernels.rotary import rotary

        return rotary(q, k, self.positions, self.cos_sin_cache)


def apply_rotary(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, D) by the (T, 2, 1, D) cos/sin from `RotaryEmbedding.lookup`."""
    cos, sin = cos_sin[:, 0], cos_sin[:, 1]  # (T, 1, D) each
    return (x * cos) + (rotate_half(x) * sin)
