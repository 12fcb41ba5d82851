"""Rotary position embedding applied in place to q and k (RoFormer, Su et al. 2021).

The rotate_half convention of engine.layers.rotary: the head dimension splits into two halves
x1, x2 that rotate together, `out = x * cos + cat(-x2, x1) * sin`. The cos/sin cache is
`RotaryEmbedding.cos_sin`, `(max_positions, 2, D)` with [:, 0] = cos and [:, 1] = sin; any
frequency scaling (linear, llama3) is already folded into it, so the kernel only looks it up.
Each product and the sum are rounded to the input dtype as torch rounds them, so bfloat16
results match the model's eager rotary. `rotary_write_kv` also stores the rotated keys and the
values into the paged KV cache (baton_kernels.write_kv's layout and slots), in the same pass: a
decode step's layer then launches one kernel for both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from baton_kernels.pdl import use_pdl


@triton.jit
def _rotate_heads(
    x_ptr,
    stride_t,
    stride_h,
    token,
    num_heads,
    cos1,
    cos2,
    sin1,
    sin2,
    dst_ptr,  # a second place for the rotated heads (the KV cache slot), if STORE_DST
    dst_stride_h,
    store_dst,  # runtime: False for a padding row (negative slot)
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    STORE_DST: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (offs[None, :] < HALF)
    ptr1 = x_ptr + token * stride_t + heads[:, None] * stride_h + offs[None, :]  # (BH, HALF)
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    # x * cos and rotate_half(x) * sin are rounded separately, then summed, like torch does.
    out1 = (a1 * cos1[None, :]).to(dtype).to(tl.float32) + (-a2 * sin1[None, :]).to(dtype).to(
        tl.float32
    )
    out2 = (a2 * cos2[None, :]).to(dtype).to(tl.float32) + (a1 * sin2[None, :]).to(dtype).to(
        tl.float32
    )
    tl.store(ptr1, out1.to(dtype), mask=mask)
    tl.store(ptr1 + HALF, out2.to(dtype), mask=mask)
    if STORE_DST:
        dst1 = dst_ptr + heads[:, None] * dst_stride_h + offs[None, :]
        dst_mask = mask & store_dst
        tl.store(dst1, out1.to(dst_ptr.dtype.element_ty), mask=dst_mask)
        tl.store(dst1 + HALF, out2.to(dst_ptr.dtype.element_ty), mask=dst_mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cache_ptr,
    kv_cache_ptr,
    slot_ptr,
    num_q_heads,
    num_k_heads,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_p,
    stride_cache_cs,
    stride_c_kv,
    stride_c_block,
    stride_c_tok,
    stride_c_head,
    block_size,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    WRITE_KV: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    if USE_PDL:  # baton_kernels.pdl: everything below reads the previous kernel's output
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    cos_ptr = cache_ptr + pos * stride_cache_p + offs
    sin_ptr = cos_ptr + stride_cache_cs
    cos1 = tl.load(cos_ptr, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr, stride_qt, stride_qh, token, num_q_heads, cos1, cos2, sin1, sin2,
        q_ptr, 0, False, HALF, BLOCK_HQ, BLOCK_HALF, False,
    )  # fmt: skip
    slot = 0
    key_slot = kv_cache_ptr
    if WRITE_KV:  # the rotated keys (and the values) also go to the token's cache slot
        slot = tl.load(slot_ptr + token).to(tl.int64)
        block = tl.maximum(slot, 0) // block_size
        key_slot += block * stride_c_block + (tl.maximum(slot, 0) % block_size) * stride_c_tok
    _rotate_heads(
        k_ptr, stride_kt, stride_kh, token, num_k_heads, cos1, cos2, sin1, sin2,
        key_slot, stride_c_head, slot >= 0, HALF, BLOCK_HK, BLOCK_HALF, WRITE_KV,
    )  # fmt: skip
    if WRITE_KV:
        heads = tl.arange(0, BLOCK_HK)
        dims = tl.arange(0, 2 * BLOCK_HALF)
        v_mask = (heads[:, None] < num_k_heads) & (dims[None, :] < 2 * HALF) & (slot >= 0)
        v = tl.load(
            v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=v_mask
        )
        dst = key_slot + stride_c_kv + heads[:, None] * stride_c_head + dims[None, :]
        tl.store(dst, v.to(kv_cache_ptr.dtype.element_ty), mask=v_mask)


def rotary(
    q: torch.Tensor,  # (T, H, D), last dim contiguous; rotated in place
    k: torch.Tensor,  # (T, Hkv, D), last dim contiguous; rotated in place
    positions: torch.Tensor,  # (T,) integer positions (tokens)
    cos_sin_cache: torch.Tensor,  # (max_positions, 2, D): RotaryEmbedding.cos_sin
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in place by the cos/sin of each token's position; returns (q, k).

    q and k may be strided views (e.g. slices of a fused qkv projection) as long as their last
    dimension is contiguous. Positions must lie in [0, max_positions).
    """
    _launch(q, k, positions, cos_sin_cache)
    return q, k


def rotary_write_kv(
    q: torch.Tensor,  # (T, H, D), last dim contiguous; rotated in place
    k: torch.Tensor,  # (T, Hkv, D), last dim contiguous; rotated in place
    v: torch.Tensor,  # (T, Hkv, D), last dim contiguous
    positions: torch.Tensor,  # (T,) integer positions (tokens)
    cos_sin_cache: torch.Tensor,  # (max_positions, 2, D): RotaryEmbedding.cos_sin
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D), last dim contiguous
    slot_mapping: torch.Tensor,  # (T,) integer slots; < 0 = do not store the row
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary` and then `baton_kernels.write_kv.write_kv` of the rotated k and v, in one kernel (a
    launch and a pass over k saved per layer); returns (q, k)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape or kv_cache.shape[3:] != (num_kv_heads, head_dim):
        raise ValueError("k, v must be (T, Hkv, D) matching kv_cache (2, N, B, Hkv, D)")
    if slot_mapping.shape != (num_tokens,):
        raise ValueError("slot_mapping must hold one slot per token")
    if v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("v and kv_cache need a contiguous last dimension")
    _launch(q, k, positions, cos_sin_cache, v, kv_cache, slot_mapping)
    return q, k


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    v: torch.Tensor | None = None,
    kv_cache: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError("q (T, H, D), k (T, Hkv, D) and positions (T,) must agree on T and D")
    if cos_sin_cache.shape[1:] != (2, head_dim) or head_dim % 2:
        raise ValueError(f"cos_sin_cache must be (P, 2, {head_dim}) with an even head_dim")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache need a contiguous last dimension")
    if num_tokens == 0:
        return
    write = kv_cache is not None
    vv = v if v is not None else k
    cache = kv_cache if kv_cache is not None else cos_sin_cache
    c_strides = kv_cache.stride()[:4] if kv_cache is not None else (0, 0, 0, 0)
    half, pdl = head_dim // 2, use_pdl(q)
    _rotary_kernel[(num_tokens,)](
        q, k, vv, positions, cos_sin_cache, cache,
        slot_mapping if slot_mapping is not None else positions,
        num_q_heads, k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), vv.stride(0), vv.stride(1),
        cos_sin_cache.stride(0), cos_sin_cache.stride(1),
        *c_strides,
        kv_cache.shape[2] if kv_cache is not None else 1,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(half),
        WRITE_KV=write,
        USE_PDL=pdl,
        num_warps=4,
        launch_pdl=pdl,
    )  # fmt: skip


def rotary_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch oracle of `rotary` (in place too), as engine.layers.rotary.apply_rotary."""
    cos_sin = cos_sin_cache[positions].unsqueeze(2)  # (T, 2, 1, D)
    cos, sin = cos_sin[:, 0], cos_sin[:, 1]  # (T, 1, D) each
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        x.copy_((x * cos) + (torch.cat((-x2, x1), dim=-1) * sin))
    return q, k
