"""Attention over the paged KV cache, behind one interface.

A step's batch is ragged: the new tokens of every scheduled sequence are flattened into one
`(T, ...)` tensor, sequence `i` owning rows `query_start_loc[i]:query_start_loc[i + 1]`. A row is
either a prefill-chunk token or the one decode token of a running sequence; nothing is padded.

KV cache of one layer (the layout the model runner allocates and kv_transfer moves)::

    kv_cache: (2, num_blocks, block_size, num_kv_heads, head_dim)
               ^ 0 = keys, 1 = values
    slot = block_id * block_size + offset_in_block

This file holds the torch implementation used on CPU (and as the GPU kernels' oracle) and the
Triton backend over `baton_kernels/`, both behind the same `AttentionBackend` interface; a
model's `engine.layers.Attention` picks one when it is built.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence


@dataclass(slots=True)
class AttentionMetadata:
    """Where each new token goes in the cache and what each sequence attends to.

    `seq_lens[i]` is sequence i's context length in tokens after this step (cached + new);
    `block_tables[i]` holds its block ids, enough blocks to cover `seq_lens[i]` (and maybe
    padding after them, never read: `from_table` makes every row as long as the longest).
    """

    slot_mapping: torch.Tensor  # (T,) int64
    query_start_loc: list[int]  # (S + 1,)
    seq_lens: list[int]  # (S,)
    block_tables: Sequence[torch.Tensor]  # S x (num_blocks_i,) int64
    _padded: dict[str, Any] = field(default_factory=dict)  # built once per step, for kernels
    _table: torch.Tensor | None = None  # (S, max_blocks) int64, when built from one

    @classmethod
    def from_table(
        cls,
        slot_mapping: torch.Tensor,
        query_start_loc: list[int],
        seq_lens: list[int],
        table: torch.Tensor,  # (S, max_blocks) int64, 0-padded, on the compute device
    ) -> AttentionMetadata:
        """Metadata over one padded block table: no per-sequence tensors to make (its rows
        are views, made when asked for)."""
        return cls(slot_mapping, query_start_loc, seq_lens, _TableRows(table), _table=table)

    def set_padded(self, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor) -> None:
        """Give `padded` the batch's context lengths (S,) and query offsets (S + 1,), int32,
        already on the device (with an int32 table from `from_table`): it then copies nothing."""
        assert self._table is not None and self._table.dtype == torch.int32
        self._padded.update(
            block_tables=self._table,
            seq_lens=seq_lens,
            cu_seqlens_q=cu_seqlens_q,
            **_row_counts(self.query_start_loc),
        )

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def padded(self, device: torch.device) -> dict[str, Any]:
        """The batch as kernels take it (built on first use, shared by every layer):
        `block_tables` (S, max_blocks) int32 (0-padded), `seq_lens` (S,) and `cu_seqlens_q`
        (S + 1,) int32, `max_seqlen_q`, `all_decode` (every sequence has one query row) and
        `num_decodes` (how many leading sequences have one query row)."""
        if not self._padded:
            # Padded where the tables already are (no copy back to the host on a GPU).
            tables = self._table
            if tables is None:
                tables = pad_sequence(list(self.block_tables), batch_first=True, padding_value=0)
            self._padded.update(
                block_tables=tables.to(device=device, dtype=torch.int32),
                seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32).to(device),
                cu_seqlens_q=torch.tensor(self.query_start_loc, dtype=torch.int32).to(device),
                **_row_counts(self.query_start_loc),
            )
        return self._padded


class _TableRows(Sequence[torch.Tensor]):
    """The rows of a padded block table as `AttentionMetadata.block_tables`, each a view made
    when asked for (only the torch reference's prefill path reads them)."""

    def __init__(self, table: torch.Tensor) -> None:
        self._table = table

    def __len__(self) -> int:
        return self._table.shape[0]

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[torch.Tensor]: ...
    def __getitem__(self, i: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        if isinstance(i, slice):
            return list(self._table.unbind(0))[i]
        return self._table[i]


def _row_counts(query_start_loc: list[int]) -> dict[str, Any]:
    """`max_seqlen_q`, `all_decode` and `num_decodes` of `AttentionMetadata.padded`."""
    rows = [b - a for a, b in itertools.pairwise(query_start_loc)]
    longest = max(rows)
    return {
        "max_seqlen_q": longest,
        "all_decode": longest == 1,
        "num_decodes": next((i for i, n in enumerate(rows) if n != 1), len(rows)),
    }


class Rotation(Protocol):
    """The rotary position embedding of one step's tokens (`engine.layers.rotary.Rope`)."""

    positions: torch.Tensor  # (T,) token positions
    cos_sin_cache: torch.Tensor  # (max_positions, 2, head_dim): [:, 0] cos, [:, 1] sin

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (T, H, D), k (T, Hkv, D) -> rotated (maybe in place)."""
        ...


class AttentionBackend(ABC):
    """Computes attention for one layer and writes the layer's new K/V into its cache."""

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # (T, num_heads, head_dim)
        k: torch.Tensor,  # (T, num_kv_heads, head_dim)
        v: torch.Tensor,  # (T, num_kv_heads, head_dim)
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
        rope: Rotation | None = None,
    ) -> torch.Tensor:  # (T, num_heads, head_dim)
        """Rotate q and k by `rope` (None: they are rotated already), store k/v at
        `meta.slot_mapping`, then attend causally over each sequence's context. The rotation
        is the backend's so that it can fuse it with the KV store."""


class TorchPagedAttention(AttentionBackend):
    """Reference implementation in plain torch.

    Decode rows (one query per sequence) are attended together in one batched product over
    the sequences' gathered blocks (masked past each sequence's length); prefill chunks go
    through SDPA one sequence at a time.
    """

    def forward(self, q, k, v, kv_cache, meta, scale, sliding_window, rope=None):  # type: ignore[override]
        if rope is not None:
            q, k = rope.apply(q, k)
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        flat_k = kv_cache[0].view(-1, num_kv_heads, head_dim)
        flat_v = kv_cache[1].view(-1, num_kv_heads, head_dim)
        flat_k.index_copy_(0, meta.slot_mapping, k)
        flat_v.index_copy_(0, meta.slot_mapping, v)

        out = torch.empty_like(q)
        decodes = []
        for i, seq_len in enumerate(meta.seq_lens):
            start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
            if end - start == 1:
                decodes.append(i)
                continue
            if end - start == seq_len:  # no cached context: the new K/V are all of it
                keys, values = k[start:end], v[start:end]
            else:
                blocks = meta.block_tables[i]
                keys = kv_cache[0, blocks].flatten(0, 1)[:seq_len]  # (L, Hkv, D)
                values = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
            out[start:end] = attend(q[start:end], keys, values, scale, sliding_window)
        if decodes:
            rows = torch.tensor([meta.query_start_loc[i] for i in decodes], device=q.device)
            out[rows] = attend_decode(q[rows], kv_cache, meta, decodes, scale, sliding_window)
        return out


def attend_decode(
    q: torch.Tensor,  # (S, H, D): one query per sequence, at position seq_len - 1
    kv_cache: torch.Tensor,  # (2, num_blocks, block_size, Hkv, D)
    meta: AttentionMetadata,
    seqs: list[int],  # which of meta's sequences these rows belong to
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # (S, H, D)
    """One batched attention for single-token queries over each sequence's paged context."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[3], kv_cache.shape[2]
    lens = torch.tensor([meta.seq_lens[i] for i in seqs], device=q.device)
    padded = meta.padded(q.device)["block_tables"]
    tables = padded[torch.tensor(seqs, device=q.device)].long()  # (S, max_blocks), 0-padded
    max_blocks = tables.shape[1]
    span = max_blocks * block_size
    # (S, Hkv, span, D): each sequence's blocks gathered, then made contiguous per head
    keys = kv_cache[0, tables].view(num_seqs, span, num_kv_heads, head_dim).transpose(1, 2)
    values = kv_cache[1, tables].view(num_seqs, span, num_kv_heads, head_dim).transpose(1, 2)
    key_pos = torch.arange(span, device=q.device)
    visible = key_pos < lens.unsqueeze(1)  # (S, span)
    if sliding_window is not None:
        visible &= key_pos > (lens - 1 - sliding_window).unsqueeze(1)
    # The G query heads that share a KV head act as G query rows: no K/V repetition.
    group = num_heads // num_kv_heads
    out = F.scaled_dot_product_attention(
        q.view(num_seqs, num_kv_heads, group, head_dim),
        keys.reshape(num_seqs, num_kv_heads, span, head_dim),
        values.reshape(num_seqs, num_kv_heads, span, head_dim),
        attn_mask=visible[:, None, None, :],
        scale=scale,
    )  # (S, Hkv, G, D)
    return out.reshape(num_seqs, num_heads, head_dim)  # CUDA SDPA may return it strided


def attend(
    q: torch.Tensor,  # (Lq, H, D): the last Lq positions of the context
    keys: torch.Tensor,  # (L, Hkv, D)
    values: torch.Tensor,  # (L, Hkv, D)
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:  # (Lq, H, D)
    """Causal (optionally sliding-window) attention of the last `Lq` positions over `L` keys.

    Query j sits at absolute position p = L - Lq + j and sees keys t with t <= p and, with a
    window W, t > p - W (W keys including itself, as transformers masks it).
    """
    num_q, seq_len = q.shape[0], keys.shape[0]
    group = q.shape[1] // keys.shape[1]
    if group > 1:  # SDPA's enable_gqa is far slower on CPU than repeating K/V
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    mask = _causal_mask(num_q, seq_len, sliding_window, q.device)
    # 4-D inputs: on CPU, SDPA takes its fused flash kernel only for (B, H, L, D).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, H, Lq, D)
        keys.transpose(0, 1).unsqueeze(0),  # (1, H, L, D)
        values.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None and num_q > 1,
        scale=scale,
    )
    return out[0].transpose(0, 1)


def _causal_mask(
    num_q: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean (Lq, L) mask, or None where plain causal (or no mask) is exact."""
    windowed = sliding_window is not None and seq_len > sliding_window
    if not windowed and (num_q == 1 or num_q == seq_len):
        return None
    pos = torch.arange(seq_len - num_q, seq_len, device=device).unsqueeze(1)  # (Lq, 1)
    key_pos = torch.arange(seq_len, device=device).unsqueeze(0)  # (1, L)
    mask = key_pos <= pos
    if sliding_window is not None and windowed:
        mask &= key_pos > pos - sliding_window
    return mask


class TritonPagedAttention(AttentionBackend):
    """The GPU path: `baton_kernels/` (KV write, paged prefill attention, split-K paged decode)."""

    def __init__(self) -> None:
        from baton_kernels.paged_decode_attention import paged_decode_attention
        from baton_kernels.paged_prefill_attention import paged_prefill_attention
        from baton_kernels.rotary import rotary_write_kv
        from baton_kernels.write_kv import write_kv

        self._write_kv = write_kv
        self._rotary_write_kv = rotary_write_kv
        self._decode = paged_decode_attention
        self._prefill = paged_prefill_attention

    def forward(self, q, k, v, kv_cache, meta, scale, sliding_window, rope=None):  # type: ignore[override]
        batch = meta.padded(q.device)
        if rope is not None and batch["all_decode"]:  # one kernel rotates and stores k and v
            self._rotary_write_kv(
                q, k, v, rope.positions, rope.cos_sin_cache, kv_cache, meta.slot_mapping
            )
        else:  # prefill: two kernels, the store's grid over tokens and heads
            if rope is not None:
                q, k = rope.apply(q, k)
            self._write_kv(k, v, kv_cache, meta.slot_mapping)
        return self.attend(q, kv_cache, meta, scale, sliding_window)

    def attend(
        self,
        q: torch.Tensor,  # (T, num_heads, head_dim), rotated
        kv_cache: torch.Tensor,  # (2, num_blocks, block_size, num_kv_heads, head_dim)
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:  # (T, num_heads, head_dim)
        """`forward` after the store: for a caller that already wrote the step's rotated keys
        and values into `kv_cache` (the fused one-token projection, `baton_kernels.gemv`)."""
        batch = meta.padded(q.device)
        tables, lens = batch["block_tables"], batch["seq_lens"]
        if batch["all_decode"]:
            return self._decode(q, kv_cache, tables, lens, scale, sliding_window)
        # A mixed step: its leading one-row sequences (the model runner puts decodes first)
        # go to the decode kernel, which reads their context once per KV head; the prefill
        # kernel would spend a whole query tile on each. The prefill kernel takes the rest,
        # addressing q and out by their row offsets, so neither needs a copy.
        out = torch.empty_like(q)
        n = batch["num_decodes"]
        if n:
            self._decode(q[:n], kv_cache, tables[:n], lens[:n], scale, sliding_window, out=out[:n])
        self._prefill(
            q, kv_cache, batch["cu_seqlens_q"][n:], lens[n:], tables[n:], scale,
            sliding_window, max_seqlen_q=batch["max_seqlen_q"], out=out,
        )  # fmt: skip
        return out
