"""Linear projections, with the one-row GEMV of the Triton path (`baton_kernels.gemv`).

At batch-1 decode a projection is a matrix-vector product; on the Triton path one row times a
weight of up to 32 MiB goes through `baton_kernels.gemv` instead of cuBLAS, which also takes
the residual add after the projection (its epilogue) and the RMSNorm before it (`norm_eps`,
the norm's weight folded into the projection's: `LlamaForCausalLM.fold_norm_weights`). Two
projections fuse more: `QKVLinear` (q/k/v, rotary and the KV store in one kernel) and
`GateUpLinear` (gate/up and SwiGLU's activation). Weights are (out, in), as nn.Linear's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import Rotation
from engine.layers.activation import SiluAndMul
from engine.layers.kernels import Kernels


class _Gemv(NamedTuple):
    """`baton_kernels.gemv`'s functions, imported once a layer takes the Triton path."""

    gemv: Any
    takes: Any  # (x, weight) -> whether gemv runs it instead of cuBLAS (size included)
    one_row: Any  # (x, weight) -> whether the GEMV kernels can take it at all (any size)
    gemv_qkv_rope: Any
    gemv_gate_up_silu: Any

    @classmethod
    def load(cls) -> _Gemv:
        from baton_kernels import gemv

        return cls(gemv.gemv, gemv.takes, gemv.one_row, gemv.gemv_qkv_rope,
                   gemv.gemv_gate_up_silu)  # fmt: skip


class Linear(nn.Linear):
    """(T, in) -> (T, out): `x @ weight.T + bias`, plus `residual` when given; one row on the
    Triton path through the GEMV, the residual added in its epilogue."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
        kernels: Kernels,
    ) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self._gemv = _Gemv.load() if kernels.triton else None  # None: torch's product

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self._gemv is not None and self._gemv.takes(x, self.weight):
            return self._gemv.gemv(x, self.weight, self.bias, residual=residual)
        y = F.linear(x, self.weight, self.bias)
        return y if residual is None else y + residual

    def one_row(self, x: torch.Tensor) -> bool:
        """Whether the GEMV kernels can take `x` (one half-precision row on CUDA, on the Triton
        path), whatever the weight's size: the steps that may run with folded norms."""
        return self._gemv is not None and self._gemv.one_row(x, self.weight)

    def forward_normed(self, x: torch.Tensor, norm_eps: float) -> torch.Tensor:
        """(1, in) -> (1, out): the projection of RMSNorm(x), the norm's weight folded into
        this one's; the GEMV applies the norm's scale to its sums (Triton path only)."""
        assert self._gemv is not None, "folded norms run on the Triton path only"
        return self._gemv.gemv(x, self.weight, self.bias, norm_eps=norm_eps)


class QKVLinear(Linear):
    """The fused q|k|v projection: (T, hidden) -> (T, (H + 2 * Hkv) * D), rows [q | k | v].

    With `fuse_rope` on the Triton path, one token's projection, rotary embedding and KV store
    run as one kernel (`rotate_and_store`); not where something comes between the projection
    and the rotation (Qwen3's per-head q/k norms)."""

    def __init__(
        self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, bias: bool,
        dtype: torch.dtype, kernels: Kernels, fuse_rope: bool,
    ) -> None:  # fmt: skip
        rows = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden, rows, bias=bias, dtype=dtype, kernels=kernels)
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.fuses_rope = kernels.triton and fuse_rope

    def takes_rope(self, x: torch.Tensor) -> bool:
        """Whether `rotate_and_store` takes this step's `x` (one token within the GEMV's
        weight size): the fused path of an unfolded layer."""
        return self.fuses_rope and self._gemv is not None and self._gemv.takes(x, self.weight)

    def rotate_and_store(
        self,
        x: torch.Tensor,  # (1, hidden)
        rope: Rotation,  # the step's positions and cos/sin cache
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
        slot_mapping: torch.Tensor,  # (1,)
        norm_eps: float | None,  # RMS-normalise x first (the norm's weight folded in)
    ) -> torch.Tensor:  # (1, H, D) rotated queries; k and v go to the token's slot
        assert self._gemv is not None and self.fuses_rope
        return self._gemv.gemv_qkv_rope(
            x, self.weight, self.bias, self.num_heads, self.num_kv_heads,
            rope.positions, rope.cos_sin_cache, kv_cache, slot_mapping, norm_eps,
        )  # fmt: skip


class GateUpLinear(Linear):
    """SwiGLU's first half: (T, hidden) -> (T, I) silu(x @ gate.T) * (x @ up.T), the gate and up
    weights stacked as one (2 * I, hidden) matrix [gate | up].

    A GEMM and `SiluAndMul`; with `fuse_gate_up` on the Triton path, one row's projection and
    activation are one kernel (`baton_kernels.gemv.gemv_gate_up_silu`)."""

    def __init__(
        self, hidden: int, intermediate: int, *, bias: bool, dtype: torch.dtype, kernels: Kernels
    ) -> None:
        super().__init__(hidden, 2 * intermediate, bias=bias, dtype=dtype, kernels=kernels)
        self.act = SiluAndMul(kernels)
        self.fused = kernels.fuse_gate_up

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, norm_eps: float | None = None
    ) -> torch.Tensor:
        """`norm_eps`: x is one row to RMS-normalise first, the norm's weight folded in."""
        if self.fused and self.one_row(x):
            assert self._gemv is not None
            return self._gemv.gemv_gate_up_silu(x, self.weight, self.bias, norm_eps=norm_eps)
        if norm_eps is None:
            gate_up = F.linear(x, self.weight, self.bias)  # (T, 2I): [gate | up]
        else:
            gate_up = self.forward_normed(x, norm_eps)
        return self.act(gate_up)
