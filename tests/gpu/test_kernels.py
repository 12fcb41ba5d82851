"""Triton kernels against their plain-torch references (and the engine's own attention).

Run on a GPU machine: `python3 -m pytest -m gpu tests/gpu/test_kernels.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
pytest.importorskip("triton")

from baton_kernels.block_copy import (  # noqa: E402
    gather_blocks,
    gather_blocks_ref,
    layer_pointers,
    scatter_blocks,
    scatter_blocks_from_layers,
    scatter_blocks_layers,
    scatter_blocks_layers_ref,
    scatter_blocks_ref,
)
from baton_kernels.paged_decode_attention import (  # noqa: E402
    paged_decode_attention,
    paged_decode_attention_ref,
)
from baton_kernels.paged_prefill_attention import (  # noqa: E402
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from baton_kernels.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from baton_kernels.rotary import rotary, rotary_ref  # noqa: E402
from baton_kernels.write_kv import write_kv, write_kv_ref  # noqa: E402
from engine.attention import AttentionMetadata, attend, attend_decode  # noqa: E402
from engine.layers.rotary import RotaryEmbedding  # noqa: E402

CUDA = torch.device("cuda")
BLOCK_SIZE = 16
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}
DTYPES = [torch.float32, torch.bfloat16]
# one-row products summed in another order, or from differently rounded inputs (a folded norm)
TOL_ROW = {"atol": 3e-2, "rtol": 2e-2}


@pytest.fixture(autouse=True)
def _seed_and_exact_matmul():
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 oracles must be exact


# ---------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 7), (33, 4096), (5, 3, 1000), (2, 8192)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, shape, with_residual):
    x = torch.randn(shape, dtype=dtype, device=CUDA)
    weight = 1 + 0.1 * torch.randn(shape[-1], dtype=dtype, device=CUDA)
    residual = torch.randn_like(x) if with_residual else None
    x_before = x.clone()
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = rms_norm_ref(x, weight, 1e-6, residual)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)  # one rounded add: exact
    assert torch.equal(x, x_before)  # inputs untouched


def test_rms_norm_matches_the_model_module():
    from engine.layers import TORCH, RMSNorm

    norm = RMSNorm(2048, 1e-5, torch.bfloat16, TORCH).to(CUDA)  # the torch reference
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = torch.randn(17, 2048, dtype=torch.bfloat16, device=CUDA)
    residual = torch.randn_like(x)
    out, new_res = rms_norm(x, norm.weight.detach(), norm.eps, residual)
    torch.testing.assert_close(out, norm(x + residual).detach(), **TOL[torch.bfloat16])
    assert torch.equal(new_res, x + residual)


# ---------------------------------------------------------------- rotary


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 8, 64), (32, 8, 128), (12, 3, 64)])
@pytest.mark.parametrize("num_tokens", [1, 37, 300])
def test_rotary_matches_reference(dtype, num_heads, num_kv_heads, head_dim, num_tokens):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    cache = RotaryEmbedding(head_dim, 8192, 500000.0, scaling, dtype).to(CUDA).cos_sin
    positions = torch.randint(0, 8192, (num_tokens,), device=CUDA)
    # q and k as strided views of one fused projection, as the model slices them
    qkv = torch.randn(
        num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=CUDA
    )
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    rotary(q, k, positions, cache)
    rotary_ref(q_ref, k_ref, positions, cache)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,num_heads,num_kv_heads", [(64, 32, 8), (128, 8, 8), (80, 4, 2)])
def test_rotary_write_kv_matches_rotary_then_write_kv(dtype, head_dim, num_heads, num_kv_heads):
    from baton_kernels.rotary import rotary_write_kv

    cos_sin = RotaryEmbedding(head_dim, 4096, 500000.0, None, dtype).to(CUDA).cos_sin
    num_tokens, num_blocks = 37, 8
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype,
                      device=CUDA)  # fmt: skip
    q, k, v = qkv.split([num_heads * head_dim] + [num_kv_heads * head_dim] * 2, -1)
    q = q.view(num_tokens, num_heads, head_dim)  # strided views of the fused projection
    k = k.view(num_tokens, num_kv_heads, head_dim)
    v = v.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, 4096, (num_tokens,), device=CUDA)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=CUDA)[:num_tokens]
    slots[3] = -1  # a padding row: rotated, not stored
    cache = torch.zeros(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype,
                        device=CUDA)  # fmt: skip
    want_q, want_k, want_cache = q.clone(), k.clone(), cache.clone()
    rotary(want_q, want_k, positions, cos_sin)
    write_kv(want_k, v, want_cache, slots)
    rotary_write_kv(q, k, v, positions, cos_sin, cache, slots)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    assert torch.equal(cache, want_cache)


def test_rotary_reference_matches_the_model():
    from engine.layers.rotary import apply_rotary

    emb = RotaryEmbedding(64, 4096, 10000.0, None, torch.bfloat16).to(CUDA)
    positions = torch.randint(0, 4096, (50,), device=CUDA)
    q = torch.randn(50, 8, 64, dtype=torch.bfloat16, device=CUDA)
    k = torch.randn(50, 2, 64, dtype=torch.bfloat16, device=CUDA)
    want_q, want_k = apply_rotary(q, emb.lookup(positions)), apply_rotary(k, emb.lookup(positions))
    rotary(q, k, positions, emb.cos_sin)
    torch.testing.assert_close(q, want_q, **TOL[torch.bfloat16])
    torch.testing.assert_close(k, want_k, **TOL[torch.bfloat16])


# ---------------------------------------------------------------- write_kv and block copies


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (8, 128), (3, 64)])
@pytest.mark.parametrize("num_tokens", [1, 45, 513])
def test_write_kv_matches_reference(dtype, num_kv_heads, head_dim, num_tokens):
    num_blocks = (num_tokens // BLOCK_SIZE) + 4
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device=CUDA)
    cache_ref = cache.clone()
    kv = torch.randn(num_tokens, 2 * num_kv_heads, head_dim, dtype=dtype, device=CUDA)
    k, v = kv[:, :num_kv_heads], kv[:, num_kv_heads:]  # strided views
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=CUDA)[:num_tokens]
    if num_tokens > 1:
        slots[num_tokens // 2] = -1  # a padding row: must be skipped
    write_kv(k, v, cache, slots)
    write_kv_ref(k, v, cache_ref, slots)
    assert torch.equal(cache, cache_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_kv_heads,head_dim,n", [(1, 64, 1), (8, 128, 37), (2, 64, 200)])
def test_gather_and_scatter_blocks_match_reference(dtype, num_kv_heads, head_dim, n):
    num_blocks = n + 11
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device=CUDA)
    ids = torch.randperm(num_blocks, device=CUDA)[:n]
    packed = gather_blocks(cache, ids)
    assert packed.shape == (2, n, BLOCK_SIZE, num_kv_heads, head_dim) and packed.is_contiguous()
    assert torch.equal(packed, gather_blocks_ref(cache, ids))

    data = torch.randn_like(packed)
    target, target_ref = cache.clone(), cache.clone()
    scatter_blocks(target, ids.to(torch.int32), data)
    scatter_blocks_ref(target_ref, ids, data)
    assert torch.equal(target, target_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim,n,first,c", [(1, 64, 1, 0, 1), (8, 128, 37, 1, 3),
                                                             (8, 64, 200, 0, 4)])  # fmt: skip
def test_scatter_blocks_layers_matches_reference(dtype, num_kv_heads, head_dim, n, first, c):
    num_blocks = n + 11
    caches = [torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype,
                          device=CUDA) for _ in range(4)]  # fmt: skip
    refs = [cache.clone() for cache in caches]
    ids = torch.randperm(num_blocks, device=CUDA)[:n]
    data = torch.randn(c, 2, n, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device=CUDA)
    scatter_blocks_layers(caches, layer_pointers(caches), first, ids, data)
    scatter_blocks_layers_ref(refs, first, ids, data)
    for cache, ref in zip(caches, refs, strict=True):  # layers outside [first, first+c) untouched
        assert torch.equal(cache, ref)
    # The same from a separate tensor per layer (no stacking), other data.
    layers = [torch.randn_like(data[0]) for _ in range(c)]
    scatter_blocks_from_layers(caches, layer_pointers(caches), first, ids, layers)
    scatter_blocks_layers_ref(refs, first, ids, layers)
    for cache, ref in zip(caches, refs, strict=True):
        assert torch.equal(cache, ref)


def test_block_copy_round_trip_between_caches():
    src = torch.randn(2, 40, BLOCK_SIZE, 4, 64, dtype=torch.bfloat16, device=CUDA)
    dst = torch.zeros_like(src)
    src_ids = torch.tensor([3, 17, 5, 39], device=CUDA)
    dst_ids = torch.tensor([0, 1, 30, 2], device=CUDA)
    scatter_blocks(dst, dst_ids, gather_blocks(src, src_ids))
    assert torch.equal(dst[:, dst_ids], src[:, src_ids])
    untouched = torch.ones(40, dtype=torch.bool, device=CUDA)
    untouched[dst_ids] = False
    assert torch.count_nonzero(dst[:, untouched]) == 0


# ---------------------------------------------------------------- paged decode attention


def make_paged_context(seq_lens, num_kv_heads, head_dim, dtype, pad=-1):
    """A random cache whose blocks are shuffled among sequences, and padded block tables."""
    needed = [math.ceil(n / BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(needed) + 3
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device=CUDA)
    order = torch.randperm(num_blocks, device=CUDA)
    tables = torch.full((len(seq_lens), max(needed) + 2), pad, dtype=torch.int32, device=CUDA)
    used = 0
    for i, count in enumerate(needed):
        tables[i, :count] = order[used : used + count]
        used += count
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=CUDA)
    return cache, tables, lens


DECODE_LENS = [
    [1],
    [1, 15, 16, 17, 33],
    [100, 1000, 4999],
    [5000, 7, 2048, 257],
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(4, 4, 64), (32, 8, 128), (16, 2, 128), (8, 1, 64)]
)
@pytest.mark.parametrize("seq_lens", DECODE_LENS)
@pytest.mark.parametrize("num_splits", [None, 1, 7])
@pytest.mark.parametrize("sliding_window", [None, 300])
def test_paged_decode_attention_matches_reference(
    dtype, num_heads, num_kv_heads, head_dim, seq_lens, num_splits, sliding_window
):
    cache, tables, lens = make_paged_context(seq_lens, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(seq_lens), num_heads, head_dim, dtype=dtype, device=CUDA)
    scale = head_dim**-0.5
    out = paged_decode_attention(q, cache, tables, lens, scale, sliding_window, num_splits)
    ref = paged_decode_attention_ref(q, cache, tables, lens, scale, sliding_window, num_splits)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 2, 16, 64])
def test_paged_decode_attention_splits_agree(num_splits):
    cache, tables, lens = make_paged_context([4321, 1, 640], 8, 128, torch.float32)
    q = torch.randn(3, 32, 128, device=CUDA)
    base = paged_decode_attention_ref(q, cache, tables, lens, 128**-0.5)
    out = paged_decode_attention(q, cache, tables, lens, 128**-0.5, num_splits=num_splits)
    torch.testing.assert_close(out, base, **TOL[torch.float32])


def test_paged_decode_attention_of_one_key_is_its_value():
    cache, tables, lens = make_paged_context([1, 1], 2, 64, torch.float32)
    q = torch.randn(2, 8, 64, device=CUDA)
    out = paged_decode_attention(q, cache, tables, lens, 0.125)
    for i in range(2):
        value = cache[1, tables[i, 0].long(), 0]  # (Hkv, D)
        torch.testing.assert_close(out[i], value.repeat_interleave(4, dim=0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sliding_window", [None, 100])
def test_paged_decode_attention_agrees_with_engine_attend_decode(dtype, sliding_window):
    seq_lens = [1, 16, 17, 250, 3000]
    cache, tables, lens = make_paged_context(seq_lens, 4, 64, dtype, pad=0)
    q = torch.randn(len(seq_lens), 16, 64, dtype=dtype, device=CUDA)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(seq_lens), dtype=torch.long, device=CUDA),
        query_start_loc=list(range(len(seq_lens) + 1)),
        seq_lens=seq_lens,
        block_tables=[
            tables[i, : math.ceil(n / BLOCK_SIZE)].long() for i, n in enumerate(seq_lens)
        ],
    )
    want = attend_decode(q, cache, meta, list(range(len(seq_lens))), 0.125, sliding_window)
    out = paged_decode_attention(q, cache, tables, lens, 0.125, sliding_window)
    tol = {"atol": 2e-4, "rtol": 2e-4} if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(out, want, **tol)


def test_paged_decode_attention_large_batch_sanity():
    """A serving-sized batch: finite, right shape, agrees with the oracle (no timing)."""
    seq_lens = torch.randint(1, 3000, (48,)).tolist()
    cache, tables, lens = make_paged_context(seq_lens, 8, 128, torch.bfloat16)
    q = torch.randn(48, 32, 128, dtype=torch.bfloat16, device=CUDA)
    out = paged_decode_attention(q, cache, tables, lens, 128**-0.5)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    ref = paged_decode_attention_ref(q, cache, tables, lens, 128**-0.5)
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])


# ---------------------------------------------------------------- paged prefill attention

# (query chunk rows, context tokens) per sequence: whole prompts, chunks after cached prefixes
PREFILL_BATCHES = [
    [(1, 1)],
    [(5, 5), (17, 40), (1, 777)],
    [(100, 100), (64, 1000), (130, 130)],
    [(300, 2500), (33, 33), (200, 4100)],
]


def make_prefill_batch(batch, num_heads, num_kv_heads, head_dim, dtype):
    q_lens, seq_lens = [b[0] for b in batch], [b[1] for b in batch]
    cache, tables, lens = make_paged_context(seq_lens, num_kv_heads, head_dim, dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, dtype=dtype, device=CUDA)
    cu = torch.tensor([0, *q_lens], device=CUDA).cumsum(0).to(torch.int32)
    return q, cache, cu, lens, tables


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(4, 4, 64), (32, 8, 128), (16, 2, 128), (8, 1, 64)]
)
@pytest.mark.parametrize("batch", PREFILL_BATCHES)
@pytest.mark.parametrize("sliding_window", [None, 128])
def test_paged_prefill_attention_matches_reference(
    dtype, num_heads, num_kv_heads, head_dim, batch, sliding_window
):
    q, cache, cu, lens, tables = make_prefill_batch(batch, num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = paged_prefill_attention(q, cache, cu, lens, tables, scale, sliding_window)
    ref = paged_prefill_attention_ref(q, cache, cu, lens, tables, scale, sliding_window)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sliding_window", [None, 50])
def test_paged_prefill_attention_agrees_with_engine_attend(dtype, sliding_window):
    batch = [(40, 40), (7, 300), (129, 500)]
    q, cache, cu, lens, tables = make_prefill_batch(batch, 12, 4, 64, dtype)
    max_q = max(b[0] for b in batch)
    out = paged_prefill_attention(q, cache, cu, lens, tables, 0.125, sliding_window, max_q)
    starts = cu.tolist()
    tol = {"atol": 2e-4, "rtol": 2e-4} if dtype == torch.float32 else TOL[dtype]
    for i, (_, seq_len) in enumerate(batch):
        blocks = tables[i, : math.ceil(seq_len / BLOCK_SIZE)].long()
        keys = cache[0, blocks].flatten(0, 1)[:seq_len]
        values = cache[1, blocks].flatten(0, 1)[:seq_len]
        rows = slice(starts[i], starts[i + 1])
        want = attend(q[rows], keys, values, 0.125, sliding_window)
        torch.testing.assert_close(out[rows], want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch",
    [
        [(1, 300), (1, 40), (17, 60), (1, 5), (64, 64)],  # decodes first, then one among chunks
        [(1, 700), (1, 33), (1, 1)],  # decodes only
        [(40, 40), (1, 90)],  # no leading decode
    ],
)
def test_triton_backend_splits_a_mixed_step_between_its_kernels(dtype, batch):
    """The leading one-row sequences of a step go to the decode kernel and the rest to the
    prefill kernel, into one output: the same as attention of the whole batch."""
    from engine.attention import TritonPagedAttention

    q, cache, cu, lens, tables = make_prefill_batch(batch, 8, 2, 64, dtype)
    tables = tables.clamp(min=0)  # the engine pads with block 0
    meta = AttentionMetadata.from_table(
        torch.empty(0, dtype=torch.long, device=CUDA), cu.tolist(), lens.tolist(), tables.long()
    )
    leading = next((i for i, (rows, _) in enumerate(batch) if rows != 1), len(batch))
    assert meta.padded(CUDA)["num_decodes"] == leading
    out = TritonPagedAttention().attend(q, cache, meta, 0.125, None)
    ref = paged_prefill_attention_ref(q, cache, cu, lens, tables, 0.125)
    torch.testing.assert_close(out, ref, **TOL[dtype])


def test_attention_wrappers_write_into_out_and_check_it():
    q, cache, cu, lens, tables = make_prefill_batch([(3, 20), (1, 9)], 4, 2, 64, torch.float32)
    out = torch.full_like(q, float("nan"))
    got = paged_prefill_attention(q, cache, cu, lens, tables, 0.125, out=out)
    assert got is out and not out.isnan().any()
    decode_out = torch.empty(2, 4, 64, device=CUDA)
    got = paged_decode_attention(q[:2], cache, tables, lens, 0.125, out=decode_out)
    assert got is decode_out
    with pytest.raises(ValueError, match="out must be like q"):
        paged_decode_attention(q[:2], cache, tables, lens, 0.125, out=decode_out.half())
    with pytest.raises(ValueError, match="out must be like q"):
        paged_prefill_attention(q, cache, cu, lens, tables, 0.125, out=out[:2])


def test_prefill_then_decode_through_write_kv():
    """write_kv a prompt, prefill it, then decode one more token: the kernels compose."""
    num_kv_heads, head_dim, prompt = 2, 64, 70
    cache = torch.zeros(2, 10, BLOCK_SIZE, num_kv_heads, head_dim, device=CUDA)
    table = torch.tensor([[7, 2, 9, 0, 5, -1]], dtype=torch.int32, device=CUDA)
    slots = torch.tensor(
        [table[0, t // BLOCK_SIZE].item() * BLOCK_SIZE + t % BLOCK_SIZE for t in range(prompt + 1)],
        device=CUDA,
    )
    k = torch.randn(prompt + 1, num_kv_heads, head_dim, device=CUDA)
    v = torch.randn_like(k)
    q = torch.randn(prompt + 1, 8, head_dim, device=CUDA)
    write_kv(k[:prompt], v[:prompt], cache, slots[:prompt])
    cu = torch.tensor([0, prompt], dtype=torch.int32, device=CUDA)
    lens = torch.tensor([prompt], dtype=torch.int32, device=CUDA)
    out = paged_prefill_attention(q[:prompt], cache, cu, lens, table, 0.125)
    write_kv(k[prompt:], v[prompt:], cache, slots[prompt:])
    step = paged_decode_attention(q[prompt:], cache, table, lens + 1, 0.125, num_splits=3)
    want = attend(q, k, v, 0.125, None)  # the whole sequence at once
    torch.testing.assert_close(out, want[:prompt], atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(step, want[prompt:], atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------- silu_mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 16384), (7, 2 * 1000), (300, 2 * 8192)])
def test_silu_mul_matches_reference(dtype, shape):
    from baton_kernels.silu_mul import silu_mul, silu_mul_ref

    x = 3 * torch.randn(shape, dtype=dtype, device=CUDA)
    got, want = silu_mul(x), silu_mul_ref(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    if dtype == torch.bfloat16:  # exp differs from torch's in the last bit at most
        torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- gemv (one-row linear layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3072, 2048), (2048, 8192), (1000, 200), (5, 4096), (7, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_reference(dtype, shape, bias):
    from baton_kernels.gemv import gemv, gemv_ref

    n, k = shape
    x = torch.randn(1, k, dtype=dtype, device=CUDA)
    weight = torch.randn(n, k, dtype=dtype, device=CUDA) * k**-0.5
    b = torch.randn(n, dtype=dtype, device=CUDA) if bias else None
    got = gemv(x, weight, b)
    assert got.shape == (1, n) and got.dtype == dtype
    # float32 sums in another order than the oracle's: the outputs differ by their rounding
    torch.testing.assert_close(got, gemv_ref(x, weight, b), atol=3e-2, rtol=2e-2)


def test_gemv_rejects_bad_shapes_and_takes_only_what_it_suits():
    from baton_kernels.gemv import MAX_WEIGHT_ELEMENTS, gemv, takes

    weight = torch.randn(8, 16, dtype=torch.bfloat16, device=CUDA)
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv(torch.randn(2, 16, dtype=torch.bfloat16, device=CUDA), weight)
    with pytest.raises(ValueError, match="weight"):
        gemv(torch.randn(1, 17, dtype=torch.bfloat16, device=CUDA), weight)
    row = torch.randn(1, 16, dtype=torch.bfloat16, device=CUDA)
    assert takes(row, weight)
    assert not takes(row.float(), weight.float())  # float32 models keep cuBLAS's exact path
    assert not takes(torch.randn(2, 16, dtype=torch.bfloat16, device=CUDA), weight)
    big = torch.empty(MAX_WEIGHT_ELEMENTS // 16 + 1, 16, dtype=torch.bfloat16, device=CUDA)
    assert not takes(row, big)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 8, 64), (8, 8, 128), (4, 2, 80)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("slot", [21, -1])  # -1: a padding row, nothing stored
def test_gemv_qkv_rope_is_gemv_then_rotary_write_kv(
    dtype, num_heads, num_kv_heads, head_dim, bias, slot
):
    from baton_kernels.gemv import gemv, gemv_qkv_rope
    from baton_kernels.rotary import rotary_write_kv

    hidden, rows = 2048, (num_heads + 2 * num_kv_heads) * head_dim
    cos_sin = RotaryEmbedding(head_dim, 4096, 500000.0, None, dtype).to(CUDA).cos_sin
    x = torch.randn(1, hidden, dtype=dtype, device=CUDA)
    weight = torch.randn(rows, hidden, dtype=dtype, device=CUDA) * hidden**-0.5
    b = torch.randn(rows, dtype=dtype, device=CUDA) if bias else None
    position = torch.tensor([3001], device=CUDA)
    slots = torch.tensor([slot], device=CUDA)
    cache = torch.randn(2, 4, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype, device=CUDA)
    want_cache = cache.clone()
    q, k, v = gemv(x, weight, b).split([num_heads * head_dim] + [num_kv_heads * head_dim] * 2, -1)
    want_q = q.reshape(1, num_heads, head_dim).clone()
    k = k.reshape(1, num_kv_heads, head_dim).clone()
    rotary_write_kv(want_q, k, v.reshape(1, num_kv_heads, head_dim), position, cos_sin,
                    want_cache, slots)  # fmt: skip
    got_q = gemv_qkv_rope(x, weight, b, num_heads, num_kv_heads, position, cos_sin, cache, slots)
    # Values are the same GEMV's (the values in the cache match bit for bit); the rotated q
    # and k differ from the two-kernel path's in the last bit of about one value in eight, a
    # rounding of the rotation's products the compiled kernels take differently. A wrong pair,
    # head or position would be off by whole units.
    torch.testing.assert_close(got_q, want_q, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(cache, want_cache, atol=1e-2, rtol=1e-2)
    assert torch.equal(cache[1], want_cache[1])  # the values: no rotation, no rounding apart


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inter,hidden", [(8192, 2048), (1000, 300), (3, 64)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("block_n", [2, 4, 8])
def test_gemv_gate_up_silu_is_gemv_then_silu_mul(dtype, inter, hidden, bias, block_n):
    from baton_kernels.gemv import GemvConfig, gemv, gemv_gate_up_silu
    from baton_kernels.silu_mul import silu_mul

    x = torch.randn(1, hidden, dtype=dtype, device=CUDA)
    weight = torch.randn(2 * inter, hidden, dtype=dtype, device=CUDA) * hidden**-0.5
    b = torch.randn(2 * inter, dtype=dtype, device=CUDA) if bias else None
    cfg = GemvConfig(block_n, min(2048, 1 << (hidden - 1).bit_length()), 4, 3)
    got = gemv_gate_up_silu(x, weight, b, cfg)
    want = silu_mul(gemv(x, weight, b, GemvConfig(2, cfg.block_k, 4, 3)))
    assert got.shape == (1, inter)
    # the same float32 sums, each row's in the same order whatever its tile: within a rounding
    torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3072, 2048), (2048, 8192), (1000, 200), (7, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_applies_a_folded_rms_norm_and_adds_a_residual(dtype, shape, bias):
    """`norm_eps` with the norm's weight folded into the weight: within a rounding of the
    rms_norm kernel followed by the GEMV; `residual`: the GEMV then the add, bit for bit."""
    from baton_kernels.gemv import fold_norm_weight, gemv, gemv_ref

    n, k = shape
    x = 3 * torch.randn(1, k, dtype=dtype, device=CUDA)
    weight = torch.randn(n, k, dtype=dtype, device=CUDA) * k**-0.5
    b = torch.randn(n, dtype=dtype, device=CUDA) if bias else None
    norm_w = torch.rand(k, dtype=dtype, device=CUDA) + 0.5
    folded = fold_norm_weight(weight, norm_w)
    got = gemv(x, folded, b, norm_eps=1e-5)
    torch.testing.assert_close(got, gemv(rms_norm(x, norm_w, 1e-5)[0], weight, b), **TOL_ROW)
    torch.testing.assert_close(got, gemv_ref(x, folded, b, norm_eps=1e-5), **TOL_ROW)
    residual = torch.randn(1, n, dtype=dtype, device=CUDA)
    assert torch.equal(gemv(x, weight, b, residual=residual), gemv(x, weight, b) + residual)
    with pytest.raises(ValueError, match="residual"):
        gemv(x, weight, b, residual=residual.float())
    with pytest.raises(ValueError, match="norm_weight"):
        fold_norm_weight(weight, norm_w[:-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_gemvs_apply_a_folded_rms_norm(dtype, bias):
    """gemv_qkv_rope and gemv_gate_up_silu with `norm_eps` on the folded weight: within a
    rounding of the same kernels on rms_norm's output with the weight unfolded."""
    from baton_kernels.gemv import fold_norm_weight, gemv_gate_up_silu, gemv_qkv_rope

    hidden, heads, kv_heads, dim, inter = 2048, 32, 8, 64, 1024
    x = 3 * torch.randn(1, hidden, dtype=dtype, device=CUDA)
    norm_w = torch.rand(hidden, dtype=dtype, device=CUDA) + 0.5
    normed = rms_norm(x, norm_w, 1e-6)[0]
    rows = (heads + 2 * kv_heads) * dim
    w_qkv = torch.randn(rows, hidden, dtype=dtype, device=CUDA) * hidden**-0.5
    b_qkv = torch.randn(rows, dtype=dtype, device=CUDA) if bias else None
    cos_sin = RotaryEmbedding(dim, 4096, 500000.0, None, dtype).to(CUDA).cos_sin
    position, slots = torch.tensor([77], device=CUDA), torch.tensor([5], device=CUDA)
    caches = [torch.zeros(2, 2, BLOCK_SIZE, kv_heads, dim, dtype=dtype, device=CUDA)
              for _ in range(2)]  # fmt: skip
    want_q = gemv_qkv_rope(normed, w_qkv, b_qkv, heads, kv_heads, position, cos_sin, caches[0],
                           slots)  # fmt: skip
    got_q = gemv_qkv_rope(x, fold_norm_weight(w_qkv, norm_w), b_qkv, heads, kv_heads, position,
                          cos_sin, caches[1], slots, norm_eps=1e-6)  # fmt: skip
    torch.testing.assert_close(got_q, want_q, **TOL_ROW)
    torch.testing.assert_close(caches[1], caches[0], **TOL_ROW)
    assert caches[1].abs().sum() > 0  # the token's K/V were stored

    w_gu = torch.randn(2 * inter, hidden, dtype=dtype, device=CUDA) * hidden**-0.5
    b_gu = torch.randn(2 * inter, dtype=dtype, device=CUDA) if bias else None
    got = gemv_gate_up_silu(x, fold_norm_weight(w_gu, norm_w), b_gu, norm_eps=1e-6)
    torch.testing.assert_close(got, gemv_gate_up_silu(normed, w_gu, b_gu), **TOL_ROW)


# ---------------------------------------------------------------- argmax and PDL chains


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [128256, 4096, 1000, 3])
@pytest.mark.parametrize("num_rows", [1, 9, 130])
def test_argmax_is_torchs_with_its_ties(dtype, vocab, num_rows):
    from baton_kernels.argmax import argmax, argmax_ref

    logits = torch.randn(num_rows, vocab, device=CUDA).to(dtype)
    top = logits.max() + 1
    if num_rows > 4:
        logits[1, [0, vocab - 1]] = top  # tie across slices: the first wins
        logits[2, [vocab // 2, vocab // 2 + 1]] = top  # tie inside a slice
        logits[3] = 0.0  # all equal: index 0
        logits[4, -1] = top  # the last index
    assert torch.equal(argmax(logits), argmax_ref(logits))
    home = torch.full((num_rows + 3,), -5, dtype=torch.long, device=CUDA)
    assert argmax(logits, out=home[:num_rows]).data_ptr() == home.data_ptr()
    assert torch.equal(home[:num_rows], argmax_ref(logits)) and home[num_rows:].eq(-5).all()


# ---------------------------------------------------------------- decode graphs' staged inputs


@pytest.mark.parametrize("batch,num_rows", [(1, 1), (8, 5), (128, 128), (256, 200)])
@pytest.mark.parametrize("on_device", [False, True], ids=["host-ids", "previous-argmax-rows"])
def test_stage_inputs_matches_reference(batch, num_rows, on_device):
    """`engine.cuda_graphs.pack_step`'s block unpacked by the kernel and by its reference:
    tables wider than one 128-entry tile, padding rows, ids from the previous argmax."""
    import random

    import numpy as np

    from baton_kernels.stage_inputs import stage_inputs, stage_inputs_ref
    from engine.cuda_graphs import from_row, pack_step, staged_size

    n, max_blocks, block_size = 256, 400, 16
    rng = random.Random(batch + num_rows)
    positions = [rng.randrange(0, block_size * 300) for _ in range(num_rows)]
    tables = [[rng.randrange(0, 10**6) for _ in range(p // block_size + 1 + rng.randrange(3))]
              for p in positions]  # fmt: skip
    ids = [
        from_row(rng.randrange(n)) if on_device else rng.randrange(128256)
        for _ in range(num_rows)
    ]
    staged = np.zeros(staged_size(n, max_blocks), dtype=np.int32)
    pack_step(staged, batch, positions, tables, ids)
    prev = torch.randint(0, 128256, (n,), device=CUDA)
    results = []
    for fn, device in ((stage_inputs, CUDA), (stage_inputs_ref, "cpu")):
        bufs = [torch.full((n,), 7, dtype=torch.long, device=device) for _ in range(3)]
        bufs.append(torch.full((n,), 7, dtype=torch.int32, device=device))
        bufs.append(torch.full((n, max_blocks), 7, dtype=torch.int32, device=device))
        fn(torch.from_numpy(staged).to(device), prev.to(device), *bufs, batch, block_size)
        results.append([b.cpu() for b in bufs])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    tokens, pos, slots, lens, _ = results[0]
    assert pos[:num_rows].tolist() == positions and lens[:num_rows].tolist() == [
        p + 1 for p in positions
    ]
    assert slots[num_rows:batch].eq(-1).all() and slots[batch:].eq(7).all()


def test_a_decode_layer_chain_is_the_same_with_and_without_pdl():
    """The PDL-launched kernels back to back (norm, fused projection, attention, GEMV,
    activation, argmax; then the folded layer's GEMVs that normalise and add) in a CUDA graph
    give what the same chain gives launched plainly."""
    import baton_kernels.pdl as pdl
    from baton_kernels.argmax import argmax
    from baton_kernels.gemv import gemv, gemv_gate_up_silu, gemv_qkv_rope
    from baton_kernels.silu_mul import silu_mul

    if not pdl.supported(CUDA):
        pytest.skip("PDL needs sm_90 or later")
    dtype, hidden, heads, kv_heads, dim = torch.bfloat16, 2048, 32, 8, 64
    cos_sin = RotaryEmbedding(dim, 4096, 500000.0, None, dtype).to(CUDA).cos_sin
    w_qkv = torch.randn((heads + 2 * kv_heads) * dim, hidden, dtype=dtype, device=CUDA) * 0.02
    w_o = torch.randn(hidden, heads * dim, dtype=dtype, device=CUDA) * 0.02
    w_up = torch.randn(2 * 512, hidden, dtype=dtype, device=CUDA) * 0.02
    w_down = torch.randn(hidden, 512, dtype=dtype, device=CUDA) * 0.05  # weights: never
    # written by the kernel before a GEMV, which loads them before its PDL wait
    norm_w = torch.rand(hidden, dtype=dtype, device=CUDA) + 0.5
    x = torch.randn(1, hidden, dtype=dtype, device=CUDA)
    seq_lens = [700]
    cache0, tables, lens = make_paged_context(seq_lens, kv_heads, dim, dtype, pad=0)
    slots = (tables[0, 699 // BLOCK_SIZE] * BLOCK_SIZE + 699 % BLOCK_SIZE).reshape(1).long()
    position = torch.tensor([699], device=CUDA)

    def chain(cache):
        h = x
        for i in range(4):
            normed, _ = rms_norm(h, norm_w, 1e-5, x)
            q = gemv_qkv_rope(normed, w_qkv, None, heads, kv_heads, position, cos_sin, cache, slots)
            att = paged_decode_attention(q, cache, tables, lens, dim**-0.5)
            o = gemv(att.reshape(1, -1), w_o)
            h = gemv(silu_mul(gemv(o, w_up)), w_down)
            # the folded layer: norms inside the GEMVs, adds in their epilogues
            q = gemv_qkv_rope(h, w_qkv, None, heads, kv_heads, position - i - 1, cos_sin, cache,
                              slots - i - 1, norm_eps=1e-5)  # fmt: skip
            att = paged_decode_attention(q, cache, tables, lens, dim**-0.5)
            h = gemv(att.reshape(1, -1), w_o, residual=h)
            h = gemv(gemv_gate_up_silu(h, w_up, norm_eps=1e-5), w_down, residual=h)
        return h, argmax(h)

    def replayed(enabled: bool) -> tuple[torch.Tensor, ...]:
        pdl.set_enabled(enabled)  # the engine's switch (KernelConfig.pdl)
        assert pdl.use_pdl(x) == enabled
        cache = cache0.clone()
        chain(cache)  # compile outside the capture
        cache = cache0.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = chain(cache)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        return out[0].clone(), out[1].clone(), cache.clone()

    previous = pdl.set_enabled(True)
    try:
        results = [replayed(False), replayed(True)]
    finally:
        pdl.set_enabled(previous)
    (h0, i0, c0), (h1, i1, c1) = results
    assert torch.equal(h0, h1) and torch.equal(i0, i1) and torch.equal(c0, c1)
