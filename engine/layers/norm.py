"""Root-mean-square layer norm (Zhang & Sennrich 2019), with the residual add fused in."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.layers.kernels import Kernels

AddNorm = Callable[
    [torch.Tensor, torch.Tensor, float, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]
]


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32: (..., dim) -> (..., dim).

    Op order matches transformers' LlamaRMSNorm, so float32 results agree to rounding. On the
    Triton path `baton_kernels.rms_norm` does the same math (and the residual add) in one pass.
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.eps = eps
        self._add_norm: AddNorm = _triton_add_norm() if kernels.triton else add_norm_ref

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        return self.add_norm(x, None)[0]

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); without a residual, (norm(x), x)."""
        return self._add_norm(x, self.weight, self.eps, residual)


def add_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference: (weight * norm(x + residual), x + residual)."""
    if residual is not None:
        x = x + residual
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype), x


def _triton_add_norm() -> AddNorm:
    from baton_kernels.rms_norm import rms_norm

    return rms_norm
