"""The model's building blocks, each running Triton kernels (`baton_kernels`) or the torch
reference, chosen once in its constructor from a `Kernels` (`Kernels.choose` resolves the
engine's `KernelConfig` on its device), so that a model's forward pass reads as its math.

    kernels.py     Kernels: which implementation, and which GPU-path fusions, the layers run
    linear.py      Linear (one-row GEMV, residual in its epilogue), QKVLinear (+ rotary and
                   the KV store), GateUpLinear (+ SwiGLU's activation)
    norm.py        RMSNorm (residual add fused)
    activation.py  SiluAndMul
    rotary.py      RotaryEmbedding and a step's Rope
    attention.py   Attention over the paged KV cache (engine.attention's backends)
"""

from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.kernels import TORCH, Kernels
from engine.layers.linear import GateUpLinear, Linear, QKVLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import Rope, RotaryEmbedding

__all__ = [
    "TORCH",
    "Attention",
    "GateUpLinear",
    "Kernels",
    "Linear",
    "QKVLinear",
    "RMSNorm",
    "Rope",
    "RotaryEmbedding",
    "SiluAndMul",
]
