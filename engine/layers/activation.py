"""SwiGLU's activation (Shazeer 2020, "GLU Variants Improve Transformer"): silu(gate) * up."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.kernels import Kernels


class SiluAndMul(nn.Module):
    """(T, 2I) [gate | up] -> (T, I) silu(gate) * up; one kernel on the Triton path
    (`baton_kernels.silu_mul`, which rounds silu(gate) to the input's dtype first, as torch)."""

    def __init__(self, kernels: Kernels) -> None:
        super().__init__()
        self._silu_mul: Callable[[torch.Tensor], torch.Tensor] = (
            _triton_silu_mul() if kernels.triton else silu_mul_ref
        )

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:  # (T, 2I) -> (T, I)
        return self._silu_mul(gate_up)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """The torch reference: (T, 2I) -> (T, I)."""
    gate, up = gate_up.chunk(2, dim=-1)  # (T, I) each
    return F.silu(gate) * up


def _triton_silu_mul() -> Callable[[torch.Tensor], torch.Tensor]:
    from baton_kernels.silu_mul import silu_mul

    return silu_mul
