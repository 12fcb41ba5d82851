"""A step's ragged batch as tensors: what an eager forward pass reads.

Sequences run in one flat batch of T tokens (S sequences, decodes first), each token a row::

    input_ids, positions, slot_mapping: (T,) int64
    query_start_loc: (S + 1,) int32    sequence i's rows are query_start_loc[i] .. [i + 1] - 1
    seq_lens:        (S,) int32        context of sequence i after this step's chunk
    block_table:     (S, W) int32      W: the longest block list of the step
    logits_indices:  (R,) int64        the rows projected to logits: one per sampling item,
                                       then the prompt-logprob rows

Speculative decoding verifies k draft tokens of a request in the same pass: its chunk is k + 1
rows (its last token and the drafts), all of which sample, so `logits_indices` takes those
k + 1 consecutive rows for it and the sampler gets one logits row per verified position.

Built with a fixed number of tensor operations whatever the number of sequences (the host's
work per step matters at large batches), and moved to the device by two copies from pinned
memory that do not wait for it (a step may be prepared while the one before runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.cuda_graphs import fill_rows
from engine.scheduler.output import ScheduledRequest


@dataclass(slots=True)
class PromptLogprobsSlice:
    """The logits rows of one request's prompt logprobs this step."""

    request_id: str
    rows: slice  # rows of the logits tensor
    targets: list[int]  # the prompt token each row scores
    num_top: int


@dataclass(slots=True)
class BatchInputs:
    """One step's inputs on the device (shapes in the module doc)."""

    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    attn_meta: AttentionMetadata
    logits_indices: torch.Tensor  # (R,) int64 rows of the hidden states to project to logits
    sample_rows: list[ScheduledRequest]  # the items that sample, in order
    num_sampled: int  # their logits rows, first: one each, 1 + len(drafts) if verifying
    prompt_slices: list[PromptLogprobsSlice]
    items: list[ScheduledRequest] = field(default_factory=list)  # (S,) in batch (row) order


@dataclass(slots=True)
class HostRows:
    """A step's rows on the host, sequences in batch order (`collect_rows`)."""

    items: list[ScheduledRequest] = field(default_factory=list)  # (S,) in batch order
    tokens: list[int] = field(default_factory=list)  # (T,) input ids; 0 where `taken_at`
    starts: list[int] = field(default_factory=list)  # (S,) position of each chunk's first row
    counts: list[int] = field(default_factory=list)  # (S,) rows of each chunk
    query_start_loc: list[int] = field(default_factory=lambda: [0])  # (S + 1,)
    seq_lens: list[int] = field(default_factory=list)  # (S,) context after the chunk
    sample_idx: list[int] = field(default_factory=list)  # rows that sample (1 + drafts each)
    sample_rows: list[ScheduledRequest] = field(default_factory=list)  # their items
    prompt_idx: list[int] = field(default_factory=list)  # rows scored for prompt logprobs
    # (request id, first index into prompt_idx, targets, top-k) per request asking
    prompt_pieces: list[tuple[str, int, list[int], int]] = field(default_factory=list)
    taken_at: list[int] = field(default_factory=list)  # rows whose input id is on the device
    taken_from: list[int] = field(default_factory=list)  # ... at these rows of `previous`


def prepare_batch(
    items: list[ScheduledRequest],
    block_size: int,
    vocab_size: int,
    device: torch.device,
    picks: Sequence[int | None] | None = None,
    previous: torch.Tensor | None = None,
) -> BatchInputs:
    """The step's inputs on `device`. `picks[i]`, where not None, is the row of `previous`
    (a launched step's argmax, (N,) int64 on the device) holding item i's input token."""
    rows = collect_rows(items, picks or [None] * len(items), vocab_size)
    table = block_table(rows.items)  # (S, W) int32
    positions, slots = positions_and_slots(rows, table, block_size)  # (T,), (T,) int64
    # Two staging buffers, one per dtype, each moved by one copy
    ids, positions, slots, logits_indices, dst, src = staged(
        device,
        torch.long,
        torch.tensor(rows.tokens),
        positions,
        slots,
        torch.tensor(rows.sample_idx + rows.prompt_idx, dtype=torch.long),
        torch.tensor(rows.taken_at, dtype=torch.long),
        torch.tensor(rows.taken_from, dtype=torch.long),
    )
    lens, cu_seqlens, flat_table = staged(
        device,
        torch.int32,
        torch.tensor(rows.seq_lens, dtype=torch.int32),
        torch.tensor(rows.query_start_loc, dtype=torch.int32),
        table.flatten(),
    )
    if rows.taken_at:
        assert previous is not None, "picks name rows of a previous step's tokens"
        ids[dst] = previous[src]  # on the device: not known here yet
    meta = AttentionMetadata.from_table(
        slots, rows.query_start_loc, rows.seq_lens, flat_table.view(table.shape)
    )
    meta.set_padded(lens, cu_seqlens)
    return BatchInputs(
        ids, positions, meta, logits_indices,
        rows.sample_rows, len(rows.sample_idx), prompt_slices(rows), rows.items,
    )  # fmt: skip


def collect_rows(
    scheduled: list[ScheduledRequest], picks: Sequence[int | None], vocab_size: int
) -> HostRows:
    """Walk the items once: tokens, chunk extents, sampled rows and prompt-logprob rows. One-row
    chunks (decodes) go first, in order: the attention backend takes the leading ones through
    its decode kernel (AttentionMetadata.padded's `num_decodes`)."""
    out = HostRows()
    query_start_loc = out.query_start_loc
    order = sorted(range(len(picks)), key=lambda i: scheduled[i].num_tokens > 1)
    for i in order:
        item = scheduled[i]
        out.items.append(item)
        request, n = item.request, item.num_tokens
        start = request.num_computed_tokens  # item.start, without the call (per item)
        end, offset = start + n, query_start_loc[-1]
        all_ids = request.all_token_ids
        pick = picks[i]
        drafts = item.draft_token_ids
        if drafts:  # the chunk: one known token, then the drafts it verifies
            out.tokens.extend(all_ids[start : end - len(drafts)])
            out.tokens.extend(drafts)
        elif pick is None:
            out.tokens.extend(all_ids[start:end])
        else:
            out.taken_at.append(offset)
            out.taken_from.append(pick)
            out.tokens.append(0)
        out.starts.append(start)
        out.counts.append(n)
        query_start_loc.append(offset + n)
        out.seq_lens.append(end)
        if end >= len(all_ids):  # item.samples (a pending token is not in all_ids yet)
            out.sample_idx.extend(range(offset + n - 1 - len(drafts), offset + n))
            out.sample_rows.append(item)
        if request.params.prompt_logprobs is not None:
            piece = prompt_logprob_rows(item, offset, vocab_size)
            if piece is not None:
                idx, targets, num_top = piece
                out.prompt_pieces.append(
                    (request.request_id, len(out.prompt_idx), targets, num_top)
                )
                out.prompt_idx.extend(idx)
    return out


def prompt_slices(rows: HostRows) -> list[PromptLogprobsSlice]:
    """Each prompt-logprobs request's logits rows: after the `sample_idx` rows."""
    first = len(rows.sample_idx)
    return [
        PromptLogprobsSlice(rid, slice(first + at, first + at + len(t)), t, k)
        for rid, at, t, k in rows.prompt_pieces
    ]


def block_table(items: list[ScheduledRequest]) -> torch.Tensor:
    """(S, W) int32: row i holds item i's block ids, zero-padded to the longest list (W)."""
    lengths = [len(item.block_ids) for item in items]
    padded = np.zeros((len(items), max(lengths)), dtype=np.int32)
    fill_rows(padded, [item.block_ids for item in items], lengths)
    return torch.from_numpy(padded)


def positions_and_slots(
    rows: HostRows, table: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) int64 positions and (T,) int64 KV slots of every row: token t of sequence i (row
    `seq[t]`) sits at position start_i + (t - first row of i), in slot
    block_id * block_size + position % block_size."""
    num_tokens, num_seqs = rows.query_start_loc[-1], len(rows.items)  # T, S
    seq = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(rows.counts))  # (T,)
    shift = torch.tensor(rows.starts) - torch.tensor(rows.query_start_loc[:-1])  # (S,)
    positions = torch.arange(num_tokens) + shift[seq]
    slots = table[seq, positions // block_size].long() * block_size + positions % block_size
    return positions, slots


def staged(device: torch.device, dtype: torch.dtype, *parts: torch.Tensor) -> list[torch.Tensor]:
    """`parts` on `device`, in `dtype`: concatenated in pinned memory, moved by one copy that
    does not wait for the device (torch keeps the pinned block until the copy ran), and split
    again into views."""
    converted = [part.to(dtype) for part in parts]
    sizes = [part.numel() for part in parts]
    if device.type != "cuda":
        return list(torch.cat(converted).split(sizes))
    host = torch.empty(sum(sizes), dtype=dtype, pin_memory=True)
    torch.cat(converted, out=host)
    return list(host.to(device, non_blocking=True).split(sizes))


def prompt_logprob_rows(
    item: ScheduledRequest, offset: int, vocab_size: int
) -> tuple[list[int], list[int], int] | None:
    """Batch rows, target tokens and top-k count for the prompt logprobs of this chunk (whose
    first row is `offset`); None when the chunk scores none."""
    request = item.request
    num_top = request.params.prompt_logprobs
    if num_top is None:
        return None
    lo = max(item.start, request.prompt_logprob_pos)
    hi = min(item.start + item.num_tokens, request.num_prompt_tokens - 1)
    if hi <= lo:
        return None
    rows = list(range(offset + lo - item.start, offset + hi - item.start))
    if num_top == -1:
        num_top = vocab_size
    return rows, request.prompt_token_ids[lo + 1 : hi + 1], num_top
