"""Which implementation the layers run: Triton kernels or the torch reference, chosen once.

`Kernels.choose` resolves an `engine.config.KernelConfig` on a device: "auto" becomes Triton or
torch, and each fusion is on only where it applies (the Triton path; folded norms in half
precision; PDL on Hopper and later). Every layer of `engine.layers` takes the result in its
constructor and picks its implementation there, so the model's forward pass has no branch on it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import KernelConfig

HALF_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True, slots=True)
class Kernels:
    """The layers' implementation, resolved for one engine; the default is the torch reference.

    `triton`: `baton_kernels` (else plain torch); `fuse_gate_up`, `fold_norms`, `pdl`: the
    `KernelConfig` switches of the same names, true only where they take effect here.
    """

    triton: bool = False
    fuse_gate_up: bool = False
    fold_norms: bool = False
    pdl: bool = False

    @classmethod
    def choose(cls, config: KernelConfig, device: torch.device, dtype: torch.dtype) -> Kernels:
        """Resolve `config` for a model of `dtype` on `device`. A ValueError if it asks for
        Triton where triton is not installed."""
        triton = _use_triton(config.backend, device)
        return cls(
            triton=triton,
            fuse_gate_up=triton and config.fuse_gate_up,
            fold_norms=triton and config.fold_norms and dtype in HALF_PRECISION,
            pdl=triton and config.pdl and _pdl_supported(device),
        )

    def configure_launches(self) -> None:
        """On the Triton path, turn PDL on or off for the kernels this process launches from now
        on (`baton_kernels.pdl`: a process setting, as every kernel of a step must agree)."""
        if self.triton:
            from baton_kernels import pdl

            pdl.set_enabled(self.pdl)

    def describe(self) -> dict[str, Any]:
        """What runs, for a benchmark's result file and the workers' /metrics labels."""
        return {
            "kernel_backend": "triton" if self.triton else "torch",
            "fuse_gate_up": self.fuse_gate_up,
            "fold_norms": self.fold_norms,
            "pdl": self.pdl,
        }


TORCH = Kernels()  # the reference everywhere: what the CPU runs


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend == "torch":
        return False
    installed = _triton_installed()
    if backend == "triton" and not installed:
        raise ValueError("kernel backend triton: triton is not installed (try auto or torch)")
    return backend == "triton" or (device.type == "cuda" and installed)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _pdl_supported(device: torch.device) -> bool:
    from baton_kernels import pdl

    return pdl.supported(device)
