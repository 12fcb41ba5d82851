"""The greedy token of each row of (N, V) logits: `logits.argmax(dim=-1)`, ties to the first.

One row of a 128k vocabulary is the whole batch-1 decode step's sampling, and torch reduces it
in too few thread blocks (18 us on an H200 for the two-stage max/argmax of
`engine.cuda_graphs.argmax_rows`). Here each program takes a `BLOCK`-wide slice of a row and
writes its first maximum and that index; a second kernel picks, per row, the first slice holding
the row's maximum. Logits are assumed finite (torch ranks NaN highest; this does not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton_kernels.pdl import use_pdl

BLOCK = 2048  # vocabulary entries per program of the first stage


@triton.jit
def _slice_max_kernel(
    logits_ptr, best_ptr, at_ptr, vocab, stride_row, num_slices,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    if USE_PDL:  # baton_kernels.pdl: the logits are the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    cols = part * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * stride_row + cols, mask=cols < vocab, other=float("-inf"))
    best, at = tl.max(x.to(tl.float32), axis=0, return_indices=True)
    tl.store(best_ptr + row * num_slices + part, best)
    tl.store(at_ptr + row * num_slices + part, part * BLOCK + at)


@triton.jit
def _pick_slice_kernel(
    best_ptr, at_ptr, out_ptr, num_slices, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.arange(0, BLOCK_S)
    mask = offs < num_slices
    best = tl.load(best_ptr + row * num_slices + offs, mask=mask, other=float("-inf"))
    _, part = tl.max(best, axis=0, return_indices=True)  # the first slice with the maximum
    at = tl.load(at_ptr + row * num_slices + part)
    tl.store(out_ptr + row, at.to(tl.int64))


def argmax(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`logits.argmax(dim=-1)` of finite (N, V) logits with a contiguous last dimension, as
    (N,) int64 (written into `out` when given: a decode graph's fixed home for its tokens)."""
    if logits.dim() != 2 or logits.stride(-1) != 1:
        raise ValueError("logits must be (N, V) with a contiguous last dimension")
    num_rows, vocab = logits.shape
    if out is None:
        out = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    elif out.shape != (num_rows,) or out.dtype != torch.int64 or out.stride(0) != 1:
        raise ValueError(f"out must be ({num_rows},) contiguous int64")
    if num_rows == 0 or vocab == 0:
        return out
    slices = triton.cdiv(vocab, BLOCK)
    best = torch.empty(num_rows, slices, dtype=torch.float32, device=logits.device)
    at = torch.empty(num_rows, slices, dtype=torch.int32, device=logits.device)
    pdl = use_pdl(logits)
    _slice_max_kernel[(num_rows, slices)](
        logits, best, at, vocab, logits.stride(0), slices,
        BLOCK=BLOCK, USE_PDL=pdl, num_warps=8, launch_pdl=pdl,
    )  # fmt: skip
    _pick_slice_kernel[(num_rows,)](
        best, at, out, slices, BLOCK_S=triton.next_power_of_2(slices), USE_PDL=pdl,
        num_warps=1, launch_pdl=pdl,
    )  # fmt: skip
    return out


def argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    """Plain-torch oracle of `argmax`."""
    return logits.argmax(dim=-1)
