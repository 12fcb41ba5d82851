"""A decode graph's per-row inputs, unpacked on the GPU from one staged host-to-device copy.

Between two decode-graph replays the stream ran six small copies (tokens, positions, slots,
context lengths, block tables from pinned host memory, and the previous argmax from the device),
each costing it 2-3 us while the GPU idled: at batch 1, some 20 us of a 0.8 ms step. Instead the
host packs a step into one int32 block (`engine.cuda_graphs.pack_step`), moved by one copy, and
the first kernel of every decode graph (`stage_inputs`) unpacks it into the graph's static
buffers: it computes each row's KV slot and context length on the GPU, and takes a row's input
token from the previous step's argmax, on the device, where the host does not know it yet
(asynchronous scheduling).

The staged block, for a graph of B rows and a block-table width W (int32)::

    [0]                          W
    [1, 1 + B)                   token of row i: an id (>= 0), or -1 - r: row r of the argmax
                                 of the previous replay (`prev`)
    [1 + B, 1 + 2B)              position of row i; -1 marks a padding row
    [1 + 2B, 1 + 2B + B * W)     block tables, row-major, W entries a row (a padding row: 0s)

Unpacked, row i: `tokens[i]`, `positions[i]` (0 for padding), `seq_lens[i]` = position + 1 (1
for padding), `slots[i]` = table[i, p // block_size] * block_size + p % block_size (-1 for
padding: no KV store), and `tables[i, :W]` (entries past W are stale, never read: a row's
context never reaches them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stage_inputs_kernel(
    staged_ptr, prev_ptr, tokens_ptr, positions_ptr, slots_ptr, lens_ptr, tables_ptr,
    batch, stride_table, block_size, BLOCK_W: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    width = tl.load(staged_ptr)  # the header (HEADER = 1 entry)
    token = tl.load(staged_ptr + 1 + row).to(tl.int64)
    pos = tl.load(staged_ptr + 1 + batch + row)
    table = staged_ptr + 1 + 2 * batch + row * width
    for start in range(0, width, BLOCK_W):
        offs = start + tl.arange(0, BLOCK_W)
        mask = offs < width
        entries = tl.load(table + offs, mask=mask)
        tl.store(tables_ptr + row.to(tl.int64) * stride_table + offs, entries, mask=mask)
    if token < 0:
        token = tl.load(prev_ptr - 1 - token)
    valid = pos >= 0
    p = tl.maximum(pos, 0)
    block = tl.load(table + p // block_size, mask=valid, other=0).to(tl.int64)
    slot = tl.where(valid, block * block_size + p % block_size, -1)
    tl.store(tokens_ptr + row, token)
    tl.store(positions_ptr + row, p.to(tl.int64))
    tl.store(lens_ptr + row, p + 1)
    tl.store(slots_ptr + row, slot)


def stage_inputs(
    staged: torch.Tensor,  # (>= staged_size,) int32, on the GPU
    prev: torch.Tensor,  # (>= B,) int64: the previous replay's argmax
    tokens: torch.Tensor,  # (>= B,) int64
    positions: torch.Tensor,  # (>= B,) int64
    slots: torch.Tensor,  # (>= B,) int64
    seq_lens: torch.Tensor,  # (>= B,) int32
    tables: torch.Tensor,  # (>= B, max_blocks) int32, last dim contiguous
    batch: int,
    block_size: int,
) -> None:
    """Unpack a staged step for rows 0..batch-1 into the static buffers (in place)."""
    if tables.stride(-1) != 1 or staged.dtype != torch.int32 or tables.dtype != torch.int32:
        raise ValueError("staged and tables must be int32, tables with a contiguous last dim")
    _stage_inputs_kernel[(batch,)](
        staged, prev, tokens, positions, slots, seq_lens, tables,
        batch, tables.stride(0), block_size, BLOCK_W=128, num_warps=1,
    )  # fmt: skip


def stage_inputs_ref(
    staged: torch.Tensor,
    prev: torch.Tensor,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    tables: torch.Tensor,
    batch: int,
    block_size: int,
) -> None:
    """Plain-torch oracle of `stage_inputs` (one row at a time)."""
    header = 1  # the width
    width = int(staged[0])
    for row in range(batch):
        token = int(staged[header + row])
        pos = int(staged[header + batch + row])
        start = header + 2 * batch + row * width
        tables[row, :width] = staged[start : start + width]
        tokens[row] = int(prev[-1 - token]) if token < 0 else token
        positions[row] = max(pos, 0)
        seq_lens[row] = max(pos, 0) + 1
        if pos >= 0:
            slots[row] = int(staged[start + pos // block_size]) * block_size + pos % block_size
        else:
            slots[row] = -1
