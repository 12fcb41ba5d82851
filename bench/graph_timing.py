"""Timing GPU operations as a decode graph runs them: back to back inside one CUDA graph.

`graph_seconds` captures a list of calls in one CUDA graph (after running them once outside the
capture, so Triton compiles and the allocator settles before anything is timed) and replays it;
`weight_copies` gives a projection one weight per layer, so that timed calls read their weights
from memory as a model's layers do instead of from the L2 cache. `bench.gpu_engine`'s kernel
bound and the GPU probes under experiments/ use both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

LAYERS = 16  # weight copies per projection: the layers of the benchmarks' Llama-3.2-1B shape
REPLAYS = 20
L2_FITS_BYTES = 256 << 20  # a matrix bigger than this alone outgrows the L2: two copies do
DTYPE = torch.bfloat16


def graph_seconds(calls: Sequence[Callable[[], Any]]) -> float:
    """Seconds per call of `calls`, captured back to back in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up: compiles and allocates outside the capture
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()  # the first replay uploads the graph: not timed
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / REPLAYS / len(calls)


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    """(N, K) bfloat16 weights, one per layer (two for a matrix that alone outgrows the L2),
    so that calls over them read the weights from memory as a model's layers do."""
    copies = LAYERS if n * k * 2 <= L2_FITS_BYTES else 2
    return [torch.randn(n, k, dtype=DTYPE, device="cuda") * k**-0.5 for _ in range(copies)]
