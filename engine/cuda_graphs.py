"""CUDA graphs for decode steps: one captured forward pass per batch size.

A decode step of a small model is launch-bound: 16 layers of a dozen kernels each cost more in
launches than in math. Like vLLM and SGLang, the runner captures the whole forward pass (and the
logits projection) once per batch size in `capture_sizes` and replays it; a decode batch of S
sequences runs the smallest captured size B >= S, its rows S..B-1 padding.

Everything a replay reads lives in static buffers filled before each replay::

    input_ids, positions, slot_mapping: (B_max,) int64   padding rows: token 0, slot -1 (no write)
    block_tables: (B_max, max_blocks) int32              row i: sequence i's block ids
    seq_lens:     (B_max,) int32                         padding rows: 1

`max_blocks` covers `max_model_len`, so the split count of the decode attention kernel (chosen
from shapes only) is fixed per captured size. The host side fills pinned copies of the buffers
and moves each with one asynchronous copy: no synchronisation until the sampler reads tokens.
Two sets of pinned buffers alternate, so the host may fill step k+1's while step k's copies are
still queued (asynchronous scheduling launches a step before reading the previous one's tokens);
a set is reused only after its copies ran. With asynchronous scheduling a step's tokens may also
come from the GPU (the previous step's argmax), and its greedy ids go back to pinned host
memory (`greedy_to_host`) without stalling the stream.
Decode steps use the graphs, and so do steps with short prompt chunks, each chunk as one row
per token of the same sequence (`ModelRunner._graph_rows`); never prompt logprobs, and only
with the Triton attention backend, whose decode path reads nothing but these tensors.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from engine.attention import AttentionMetadata


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's ladder: 1, 2, 4, then every multiple of 8, up to `max_num_seqs` (included)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return sorted(set(sizes) | {max_num_seqs})


Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]

def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for (N, V) logits (the first maximum's index); on a GPU through
    `baton_kernels.argmax` (torch reduces one 128k row in too few thread blocks)."""
    if logits.is_cuda:
        from baton_kernels.argmax import argmax

        return argmax(logits)
    return logits.argmax(dim=-1)


class DecodeGraphs:
    """Captured decode forward passes over static buffers; `run` replays the right one."""

    def __init__(
        self,
        forward: Forward,  # (input_ids, positions, meta) -> (B, vocab) logits
        device: torch.device,
        capture_sizes: Sequence[int],
        max_blocks: int,  # block-table width: cdiv(max_model_len, block_size)
    ) -> None:
        self.device = device
        self.sizes = sorted(capture_sizes)
        n = self.sizes[-1]  # the largest batch
        self._forward = forward
        # Host buffers are pinned, so each step's copies are asynchronous; two sets alternate,
        # each reused only once the copies out of it ran (`_copied`).
        self._host_sets = [_host_buffers(n, max_blocks) for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0  # the set the next `run` fills
        self._static = {k: v.to(device) for k, v in self._host_sets[0][0].items()}
        # `launch`: pinned homes of the greedy ids, one per buffer set
        self._greedy_host = [torch.zeros(n, dtype=torch.long).pin_memory() for _ in range(2)]
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.replays = 0  # decode steps run through a graph

    def _args(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        static = self._static
        meta = AttentionMetadata(
            slot_mapping=static["slots"][:batch], query_start_loc=[], seq_lens=[], block_tables=[]
        )
        meta._padded.update(
            block_tables=static["tables"][:batch],
            seq_lens=static["seq_lens"][:batch],
            cu_seqlens_q=None,
            max_seqlen_q=1,
            all_decode=True,
        )
        return static["tokens"][:batch], static["positions"][:batch], meta

    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.sizes):
            args = self._args(batch)
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels, settle the allocator
                    self._forward(*args)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(*args)
                # Greedy tokens in the same replay: plain greedy batches need nothing else.
                self._outputs[batch] = (logits, argmax_rows(logits))
            self._graphs[batch] = graph
        torch.cuda.synchronize(self.device)

    def batch_size_for(self, num_seqs: int) -> int | None:
        """The captured size a batch of `num_seqs` decodes runs at; None if too large."""
        at = bisect.bisect_left(self.sizes, num_seqs)
        return self.sizes[at] if at < len(self.sizes) else None

    def run(
        self,
        tokens: Sequence[int] | torch.Tensor,
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (S, vocab) logits, (S,) argmax ids
        """One decode step for S sequences: token i at `positions[i]`, its blocks in
        `block_tables[i]`. Fills the static buffers and replays the graph of the next size.
        `tokens` may be a (S,) int64 tensor on the GPU (copied in on the stream). Both results
        are views into the graph's outputs, valid until the next replay of that size."""
        num_seqs = len(positions)
        batch = self.batch_size_for(num_seqs)
        assert batch is not None, "the caller checks batch_size_for first"
        turn = self._turn
        self._turn ^= 1
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()  # long done in practice: two steps back
        pinned, host = self._host_sets[turn]
        # This step's tables, packed as (batch, width) at the start of the host buffer, so only
        # the columns in use travel (entries past a sequence's own blocks are never read).
        lengths = np.fromiter(map(len, block_tables), dtype=np.int64, count=num_seqs)
        width = int(lengths.max())
        tables = host["tables"].reshape(-1)[: batch * width].reshape(batch, width)
        flat = np.fromiter(itertools.chain.from_iterable(block_tables), dtype=np.int32)
        rows = np.repeat(np.arange(num_seqs), lengths)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # each entry's row in `flat`
        tables[rows, np.arange(len(flat)) - starts] = flat
        pos = np.asarray(positions, dtype=np.int64)
        host["slots"][:num_seqs] = tables[np.arange(num_seqs), pos // block_size] * block_size
        host["slots"][:num_seqs] += pos % block_size
        if not isinstance(tokens, torch.Tensor):
            host["tokens"][:num_seqs] = tokens
        host["positions"][:num_seqs] = pos
        host["seq_lens"][:num_seqs] = pos
        host["seq_lens"][:num_seqs] += 1
        host["tokens"][num_seqs:batch] = 0
        host["positions"][num_seqs:batch] = 0
        host["slots"][num_seqs:batch] = -1
        host["seq_lens"][num_seqs:batch] = 1
        for name in ("tokens", "positions", "slots", "seq_lens"):
            self._static[name][:batch].copy_(pinned[name][:batch], non_blocking=True)
        if isinstance(tokens, torch.Tensor):
            self._static["tokens"][:num_seqs].copy_(tokens)
        packed = pinned["tables"].view(-1)[: batch * width].view(batch, width)
        self._static["tables"][:batch, :width].copy_(packed, non_blocking=True)
        copied = self._copied[turn] = torch.cuda.Event()
        copied.record()
        self._graphs[batch].replay()
        self.replays += 1
        logits, greedy = self._outputs[batch]
        return logits[:num_seqs], greedy[:num_seqs]

    def greedy_to_host(self, greedy: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Queue a copy of the last `run`'s greedy ids (S,) to pinned host memory; returns the
        host tensor, readable once the event completes (valid until the next `run` but one)."""
        host = self._greedy_host[self._turn ^ 1][: len(greedy)]  # the last run's set
        host.copy_(greedy, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done


def _host_buffers(n: int, max_blocks: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One set of pinned host buffers for the static inputs, and numpy views of them."""
    buffers = {
        "tokens": torch.zeros(n, dtype=torch.long),
        "positions": torch.zeros(n, dtype=torch.long),
        "slots": torch.full((n,), -1, dtype=torch.long),  # -1: the KV write skips the row
        "seq_lens": torch.ones(n, dtype=torch.int32),
        "tables": torch.zeros(n, max_blocks, dtype=torch.int32),
    }
    pinned = {k: v.pin_memory() for k, v in buffers.items()}
    return pinned, {k: v.numpy() for k, v in pinned.items()}  # views: writes are free
