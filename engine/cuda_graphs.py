"""CUDA graphs for decode steps: one captured forward pass per batch size.

A decode step of a small model is launch-bound: 16 layers of a dozen kernels each cost more in
launches than in math. Like vLLM and SGLang, the runner captures the whole forward pass (and the
logits projection) once per batch size in `capture_sizes` and replays it; a decode batch of S
sequences runs the smallest captured size B >= S, its rows S..B-1 padding.

Everything a replay reads lives in static buffers::

    input_ids, positions, slot_mapping: (B_max,) int64   padding rows: token 0, slot -1 (no write)
    block_tables: (B_max, max_blocks) int32              row i: sequence i's block ids
    seq_lens:     (B_max,) int32                         padding rows: 1

`max_blocks` covers `max_model_len`, so the split count of the decode attention kernel (chosen
from shapes only) is fixed per captured size. The host packs a step (tokens, positions, block
tables) into pinned memory and moves it with one asynchronous copy; the graph's first kernel
(`baton_kernels.stage_inputs`, whose module doc has the layout `pack_step` writes) unpacks it
into the static buffers, computing slots and context lengths on the GPU: no synchronisation
until the sampler reads tokens, and one copy between replays instead of six. Two pinned buffers
alternate, so the host may pack step k+1 while step k's copy is still queued (asynchronous
scheduling launches a step before reading the previous one's tokens); a buffer is reused only
after its copy ran. Every replay leaves its greedy ids in one device buffer (`last_greedy`);
with asynchronous scheduling the next step's rows name their row there instead of a token id
(the unpacking reads it on the GPU), and the ids go back to pinned host memory
(`greedy_to_host`) without stalling the stream.
Decode steps use the graphs, and so do steps with short prompt chunks, each chunk as one row
per token of the same sequence (`graph_rows`); never prompt logprobs, and only
with the Triton attention backend, whose decode path reads nothing but these tensors.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.scheduler.output import ScheduledRequest


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """vLLM's ladder: 1, 2, 4, then every multiple of 8, up to `max_num_seqs` (included)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return sorted(set(sizes) | {max_num_seqs})


def padded_batch(sizes: Sequence[int], num_rows: int) -> int | None:
    """The smallest of the (sorted) captured `sizes` that holds `num_rows`; None if none."""
    at = bisect.bisect_left(sizes, num_rows)
    return sizes[at] if at < len(sizes) else None


# Prompt chunks run in a decode graph (see `graph_rows`) while the sum over the step's chunks
# of rows x context tokens stays within this: 64k context rows read per layer (128 MiB of a 1B
# model's KV at 2 KiB per token, mostly from L2 as a chunk's rows share it) against the several
# milliseconds of an eager pass's launches.
GRAPH_PROMPT_READS = 1 << 16


def from_row(row: int) -> int:
    """The input id that stands for row `row` of the previous step's argmax, read on the GPU
    (a token the host does not know yet: asynchronous scheduling)."""
    return -1 - row


class GraphRows(NamedTuple):
    """A step as rows of a decode graph (`graph_rows`)."""

    ids: list[int]  # each row's input id: a token id, or `from_row(r)`
    positions: list[int]
    tables: list[list[int]]  # each row's block ids (a chunk's rows share its list)
    sample_rows: list[int]  # the rows whose logits are sampled, in the order of the items


def graph_rows(
    items: list[ScheduledRequest],
    sizes: Sequence[int],
    picks: Sequence[int | None] | None = None,
) -> GraphRows | None:
    """A step's items as rows of a decode graph captured at `sizes`, or None when the step
    runs eagerly. `picks[i]`, where not None, is the row of the previous step's argmax that
    holds item i's one input token (`ScheduledRequest.pending`).

    A decode is one row. A prompt chunk of n tokens from position s is n rows of the same
    sequence at positions s..s+n-1: each row stores its key and value, then attends over the
    cache up to its own position. As every row's store precedes the attention kernel, that is
    the chunk's causal attention, so a short prompt runs in one replay instead of an eager pass
    whose launches cost several milliseconds. The decode kernel reads each row's whole context,
    so chunks qualify only while their rows x context stay within `GRAPH_PROMPT_READS`. Prompt
    logprobs never run in a graph (its logits are in the model's dtype)."""
    num_rows = sum(it.num_tokens for it in items)
    if padded_batch(sizes, num_rows) is None:
        return None
    if any(it.request.params.prompt_logprobs is not None for it in items):
        return None
    picks = picks or [None] * len(items)
    if num_rows == len(items):  # one row each: a decode step, unless a chunk does not sample
        decode = GraphRows([], [], [], list(range(num_rows)))
        for it, pick in zip(items, picks, strict=True):  # one pass (per-step host time)
            request = it.request
            start, tokens = request.num_computed_tokens, request.all_token_ids
            if pick is None:
                if start + 1 < len(tokens):  # a one-token prompt chunk that samples nothing
                    break
                decode.ids.append(tokens[start])
            else:
                decode.ids.append(from_row(pick))
            decode.positions.append(start)
            decode.tables.append(it.block_ids)
        else:
            return decode
    reads = 0
    rows = GraphRows([], [], [], [])
    for it, pick in zip(items, picks, strict=True):
        request, start, n = it.request, it.start, it.num_tokens
        if n > 1:
            reads += n * (start + n)
            if reads > GRAPH_PROMPT_READS:
                return None
        drafts = it.draft_token_ids  # verified in k + 1 rows that all sample
        if pick is None:
            rows.ids.extend(request.all_token_ids[start : start + n - len(drafts)])
            rows.ids.extend(drafts)
        else:
            rows.ids.append(from_row(pick))
        rows.positions.extend(range(start, start + n))
        rows.tables.extend([it.block_ids] * n)
        if it.samples:
            rows.sample_rows.extend(range(len(rows.ids) - 1 - len(drafts), len(rows.ids)))
    return rows


HEADER = 1  # entries of the staged block before the tokens: the table width


def staged_size(batch: int, max_blocks: int) -> int:
    """Entries of the staged block for `batch` rows of at most `max_blocks` table entries."""
    return HEADER + 2 * batch + batch * max_blocks


def fill_rows(out: np.ndarray, lists: Sequence[Sequence[int]], lengths: Sequence[int]) -> None:
    """Row i of `out` (rows, width) starts with `lists[i]` (`lengths[i]` entries); the rest
    of each row is left as it is. One pass over all entries, whatever the number of rows
    (a nested list through `torch.tensor` costs about three times as long)."""
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=out.dtype, count=sum(lengths))
    out[np.arange(out.shape[1]) < np.array(lengths)[:, None]] = flat


class PackedTables:
    """What the table rows of one staged block hold since its last packing, so that the next
    packing rewrites only the rows that changed (a decode step adds a block to about one
    sequence in sixteen). Per row, the block-id list packed there and its length then: the
    lists are the KV manager's own, which only grow while their request holds them, and are
    kept alive here, so the list and its length name the contents."""

    __slots__ = ("shape", "rows")

    def __init__(self) -> None:
        self.shape: tuple[int, int] | None = None  # (batch, width) of the packed layout
        self.rows: list[tuple[Sequence[int], int]] = []


def pack_step(
    staged: np.ndarray,  # int32, at least staged_size(batch, width) entries
    batch: int,  # the graph's rows; rows past len(positions) are padding
    positions: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    ids: Sequence[int],  # each row's input id: a token id, or `from_row(r)`
    held: PackedTables | None = None,  # what `staged`'s table rows hold; updated
) -> int:
    """Pack one step into `staged` (see the module doc); returns the entries used. With
    `held`, table rows that already hold their list are left as they are."""
    num_rows = len(positions)
    if len(ids) != num_rows or len(block_tables) != num_rows:
        raise ValueError("ids, positions and block_tables need one entry per row")
    lengths = [len(t) for t in block_tables]
    width = max(lengths)
    staged[0] = width
    staged[HEADER : HEADER + num_rows] = ids
    staged[HEADER + num_rows : HEADER + batch] = 0
    pos = staged[HEADER + batch : HEADER + 2 * batch]
    pos[:num_rows] = positions
    pos[num_rows:] = -1
    end = HEADER + 2 * batch + batch * width
    tables = staged[HEADER + 2 * batch : end].reshape(batch, width)
    tables[num_rows:] = 0  # padding rows read block 0 as a one-token context
    if held is None or held.shape != (batch, width):
        fill_rows(tables[:num_rows], block_tables, lengths)
        if held is not None:
            held.shape = (batch, width)
            held.rows = list(zip(block_tables, lengths, strict=True))
        return end
    packed = held.rows
    del packed[num_rows:]
    for r, (table, n) in enumerate(zip(block_tables, lengths, strict=True)):
        if r < len(packed):
            old, old_n = packed[r]
            if old is table and old_n == n:
                continue
            start = old_n if old is table and old_n < n else 0  # a list only grows
            tables[r, start:n] = table[start:]
            packed[r] = (table, n)
        else:
            tables[r, :n] = table
            packed.append((table, n))
    return end


Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def argmax_rows(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`logits.argmax(dim=-1)` for (N, V) logits (the first maximum's index), into `out` if
    given; on a GPU through `baton_kernels.argmax` (torch reduces one 128k row in too few
    thread blocks)."""
    if logits.is_cuda:
        from baton_kernels.argmax import argmax

        return argmax(logits, out=out)
    if out is None:
        return logits.argmax(dim=-1)
    return torch.argmax(logits, dim=-1, out=out)


class DecodeGraphs:
    """Captured decode forward passes over static buffers; `run` replays the right one."""

    def __init__(
        self,
        forward: Forward,  # (input_ids, positions, meta) -> (B, vocab) logits
        device: torch.device,
        capture_sizes: Sequence[int],
        max_blocks: int,  # block-table width: cdiv(max_model_len, block_size)
        block_size: int,
    ) -> None:
        self.device = device
        self.sizes = sorted(capture_sizes)
        self.block_size = block_size
        n = self.sizes[-1]  # the largest batch
        self._forward = forward
        size = staged_size(n, max_blocks)
        # Pinned, so each step's copy is asynchronous; two alternate, each reused only once the
        # copy out of it ran (`_copied`).
        self._pinned = [torch.zeros(size, dtype=torch.int32).pin_memory() for _ in range(2)]
        self._packed = [t.numpy() for t in self._pinned]  # views: writes are free
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._held = [PackedTables(), PackedTables()]  # what each buffer's tables hold
        self._turn = 0  # the buffer the next `run` fills
        self._staged = torch.zeros(size, dtype=torch.int32, device=device)
        # Until a step lands, every row of any size is padding (position -1) fed by token -1
        # (row 0 of `last_greedy`): capture stores no KV.
        self._staged[1 : 1 + 2 * n] = -1
        self._static = {
            "tokens": torch.zeros(n, dtype=torch.long, device=device),
            "positions": torch.zeros(n, dtype=torch.long, device=device),
            "slots": torch.full((n,), -1, dtype=torch.long, device=device),
            "seq_lens": torch.ones(n, dtype=torch.int32, device=device),
            "tables": torch.zeros(n, max_blocks, dtype=torch.int32, device=device),
        }
        self.last_greedy = torch.zeros(n, dtype=torch.long, device=device)  # every replay's ids
        # `greedy_to_host`: pinned homes of the greedy ids, one per staging buffer
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

    def _replayed(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What a graph of `batch` rows runs: unpack the staged step, the forward pass, and
        the greedy ids into `last_greedy`."""
        from baton_kernels.stage_inputs import stage_inputs

        static = self._static
        stage_inputs(
            self._staged, self.last_greedy, static["tokens"], static["positions"],
            static["slots"], static["seq_lens"], static["tables"], batch, self.block_size,
        )  # fmt: skip
        logits = self._forward(*self._args(batch))
        # Greedy tokens in the same replay: plain greedy batches need nothing else.
        return logits, argmax_rows(logits, out=self.last_greedy[:batch])

    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool."""
        pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.sizes):
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile the Triton kernels, settle the allocator
                    self._replayed(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[batch] = self._replayed(batch)
            self._graphs[batch] = graph
        torch.cuda.synchronize(self.device)

    def batch_size_for(self, num_seqs: int) -> int | None:
        """The captured size a batch of `num_seqs` decodes runs at; None if too large."""
        return padded_batch(self.sizes, num_seqs)

    def run(
        self,
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        ids: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (S, vocab) logits, (S,) argmax ids
        """One step of S rows: row i at `positions[i]`, its blocks in `block_tables[i]`, its
        input id `ids[i]`: a token id, or `from_row(r)` for row r of the previous replay's
        greedy ids (`last_greedy`), read on the GPU. Packs the step, copies it in, and replays
        the graph of the next size. Both results are views into the graph's outputs, valid
        until the next replay of that size (the ids, until the next replay of any)."""
        num_rows = len(positions)
        batch = self.batch_size_for(num_rows)
        assert batch is not None, "the caller checks batch_size_for first"
        turn = self._turn
        self._turn ^= 1
        copied = self._copied[turn]
        if copied is not None:
            copied.synchronize()  # long done in practice: two steps back
        used = pack_step(
            self._packed[turn], batch, positions, block_tables, ids, self._held[turn]
        )
        self._staged[:used].copy_(self._pinned[turn][:used], non_blocking=True)
        copied = self._copied[turn] = torch.cuda.Event()
        copied.record()
        self._graphs[batch].replay()
        self.replays += 1
        logits, greedy = self._outputs[batch]
        return logits[:num_rows], greedy[:num_rows]

    def adopt_greedy(self, greedy: torch.Tensor) -> None:
        """Make (S,) greedy ids computed outside the graphs (an eager step) the previous
        replay's, for a next step's `from_row` ids (queued on the stream)."""
        self.last_greedy[: len(greedy)].copy_(greedy)

    def greedy_to_host(self, greedy: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Queue a copy of the last `run`'s greedy ids (S,) to pinned host memory; returns the
        host tensor, readable once the event completes (valid until the next `run` but one)."""
        host = self._greedy_host[self._turn ^ 1][: len(greedy)]  # the last run's set
        host.copy_(greedy, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done
