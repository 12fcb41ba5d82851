"""SwiGLU's activation (Shazeer 2020): `silu(gate) * up` from the fused gate/up projection.

    x:   (T, 2 * I)   [gate | up], the output of the model's gate_up_proj
    out: (T, I)       silu(gate) * up

One pass instead of torch's three (chunk views, silu, multiply): at batch 1 each is a launch of
its own. The numerics follow torch: silu is computed in float32 and rounded to x's dtype, then
the product of the two rounded values is rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from baton_kernels.pdl import use_pdl


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    if USE_PDL:  # baton_kernels.pdl: everything below reads the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # torch rounds silu's result to the dtype
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:  # (T, 2I) -> (T, I)
    """`silu(x[:, :I]) * x[:, I:]` in one kernel; x's last dimension must be contiguous."""
    num_tokens, width = x.shape
    if width % 2 or x.stride(-1) != 1:
        raise ValueError("x must be (T, 2 * I) with a contiguous last dimension")
    n = width // 2
    out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    if num_tokens:
        block, pdl = 1024, use_pdl(x)
        _silu_mul_kernel[(num_tokens, triton.cdiv(n, block))](
            x, out, n, x.stride(0), out.stride(0), BLOCK=block, USE_PDL=pdl, num_warps=4,
            launch_pdl=pdl,
        )  # fmt: skip
    return out


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch oracle of `silu_mul`, as engine.layers.activation.silu_mul_ref computes it."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
