"""Programmatic dependent launch (PDL) for the decode step's kernels (Hopper and later).

A decode step at batch 1 is a chain of some 170 short kernels, each of which waits for the one
before it to finish and drain before its first program starts. With PDL (CUDA's
`cudaLaunchAttributeProgrammaticStreamSerialization`, Triton's `launch_pdl=True`) the next
kernel may start as soon as every program of the current one has called
`griddepcontrol.launch_dependents`; it then runs its independent prologue (a GEMV loads its
first weight tile: weights never depend on the previous kernel) and blocks in
`griddepcontrol.wait` until the previous kernel has completed and its writes are visible.
CUDA graphs keep these edges when a step is captured.

The contract every kernel launched with `launch_pdl` keeps (`USE_PDL` constexpr): nothing it
reads that an earlier kernel writes, and nothing it writes, is touched before `gdc_wait()`.
Then the order is safe transitively: a kernel completes only after its own wait, so waiting on
the previous kernel waits on all before it. Kernels not launched this way (cuBLAS, torch) are
waited for in full, as usual. What a kernel reads before its wait (a GEMV's weights) must not be
written by the kernel just before it: weights are written at load time only.

It is off before sm_90, with a CUDA runtime older than 12.3 (the first whose graph capture keeps
programmatic edges), and under Triton's CPU interpreter, which has no inline assembly.
`set_enabled(False)` turns it off for every later launch in the process (a same-machine
comparison): the engine calls it once, when it is built, from `KernelConfig.pdl`.

Why a process setting and not an argument of each kernel: PDL is a property of the launch
chain, not of one kernel (a kernel launched with it waits on whichever kernel came before), so
every kernel of a step must agree, including those the engine launches outside the model
(`baton_kernels.argmax` in the decode graphs). One setting keeps the kernels' signatures and
their callers as they are, instead of threading one flag through every wrapper.
"""

from __future__ import annotations

import os
from functools import cache

import torch

_enabled = True  # set_enabled: the engine's switch, on unless turned off


def set_enabled(enabled: bool) -> bool:
    """Turn PDL on (where `supported`) or off for the kernels launched from now on in this
    process; returns the previous setting. CUDA graphs captured before keep their launches."""
    global _enabled
    previous, _enabled = _enabled, enabled
    return previous


def use_pdl(x: torch.Tensor) -> bool:
    """Whether kernels launched on `x`'s device take the PDL attribute and wait for it."""
    return _enabled and x.is_cuda and _supported(x.device.index or 0)


def supported(device: torch.device) -> bool:
    """Whether `device` can launch with PDL: sm_90 or later on CUDA 12.3 or later, compiled
    (not Triton's CPU interpreter)."""
    if device.type != "cuda":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _supported(device_index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's own mode, not a switch of ours
        return False
    if _version(torch.version.cuda) < (12, 3):
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _version(text: str | None) -> tuple[int, ...]:
    """"12.4" -> (12, 4); None (a CPU build of torch) -> ()."""
    return tuple(int(part) for part in text.split(".")[:2]) if text else ()
