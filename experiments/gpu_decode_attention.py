"""The paged decode attention kernel alone, at the Llama-3.2-1B shape (32 heads, 8 KV heads,
head_dim 64, bfloat16, 16-token blocks), as the decode graphs run it.

Microseconds per call (16 calls back to back in a CUDA graph, replayed) for batch sizes and
context lengths, with the split count the engine picks (`num_splits=None`: the block table is
as wide as a 128k-token context, as in the graphs) and with a few fixed split counts. Each
sequence's blocks are either consecutive ids (`contiguous`: what a fresh engine hands out) or a
random permutation (`shuffled`: the pool after many requests have come and gone), which changes
how the kernel's reads fall on the memory.

    python -m experiments.gpu_decode_attention [--out PATH.json]
"""

from __future__ import annotations

import argparse
import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.graph_timing import graph_seconds
from bench.machine import describe_machine

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 64, 16
MAX_CONTEXT = 131072  # the block table's width, as the graphs size it from max_model_len
CASES = ((1, 575), (1, 2048), (1, 8192), (1, 32768), (8, 4096), (128, 575), (128, 2048))
SPLITS = (1, 4, 16, 64)
CALLS = 16  # back to back in the graph (bench.graph_timing.graph_seconds replays it)


def block_tables(
    batch: int, context: int, layout: str, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """(batch, MAX_CONTEXT / BLOCK_SIZE) int32 tables over a pool of just enough blocks, and
    that pool's size. Sequence i holds `ceil(context / BLOCK_SIZE)` blocks: consecutive ids in
    order (`contiguous`) or a random draw without repeats from the pool (`shuffled`)."""
    per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * per_seq
    if layout == "contiguous":
        ids = torch.arange(num_blocks, dtype=torch.int32)
    elif layout == "shuffled":
        ids = torch.randperm(num_blocks, generator=generator).to(torch.int32)
    else:
        raise ValueError(f"layout must be contiguous or shuffled, got {layout!r}")
    tables = torch.zeros(batch, MAX_CONTEXT // BLOCK_SIZE, dtype=torch.int32)
    tables[:, :per_seq] = ids.view(batch, per_seq)
    return tables, num_blocks


def run_case(batch: int, context: int, layout: str) -> dict[str, Any]:
    from baton_kernels.paged_decode_attention import (
        paged_decode_attention,
        paged_decode_attention_ref,
    )

    generator = torch.Generator().manual_seed(batch * 100003 + context)
    tables, num_blocks = block_tables(batch, context, layout, generator)
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator)
    cache = cache.to("cuda", torch.bfloat16)
    tables = tables.cuda()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=generator).to("cuda", torch.bfloat16)
    scale = HEAD_DIM**-0.5
    want = paged_decode_attention_ref(q[:1], cache, tables[:1], lens[:1], scale)
    row: dict[str, Any] = {"batch": batch, "context": context, "layout": layout}
    for splits in (None, *SPLITS):
        got = paged_decode_attention(q, cache, tables, lens, scale, num_splits=splits)
        torch.testing.assert_close(got[:1].float(), want.float(), atol=2e-2, rtol=2e-2)
        key = "engine_us" if splits is None else f"splits_{splits}_us"
        call = partial(paged_decode_attention, q, cache, tables, lens, scale, num_splits=splits)
        row[key] = graph_seconds([call] * CALLS) * 1e6
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * 2
    row["engine_kv_tb_per_s"] = kv_bytes / row["engine_us"] / 1e6
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("bench/results/gpu_decode_attention.json")
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("experiments.gpu_decode_attention needs a CUDA GPU")
    rows = []
    for batch, context in CASES:
        for layout in ("contiguous", "shuffled"):
            rows.append(run_case(batch, context, layout))
            print(json.dumps(rows[-1]), flush=True)
    result = {
        "benchmark": "gpu_decode_attention",
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                  "block_size": BLOCK_SIZE, "dtype": "bfloat16", "table_context": MAX_CONTEXT},
        "cases": rows,
        "machine": describe_machine(),
        "command": "python -m experiments.gpu_decode_attention",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
