"""The batch's allowed-token bitmask: built on the host, applied to the logits before sampling.

    bitmask (N, cdiv(V, 32)) int32: bit b of word w of row i set <=> token 32 * w + b allowed

`apply_token_bitmask` is the torch reference (any device); a GPU kernel may replace it.
"""

from __future__ import annotations

import torch

_BITS = torch.arange(32, dtype=torch.int32)


def bitmask_width(vocab_size: int) -> int:
    """Words per row for a vocab of `vocab_size` tokens."""
    return -(-vocab_size // 32)


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """(num_rows, cdiv(V, 32)) int32 on the CPU, every token allowed."""
    return torch.full((num_rows, bitmask_width(vocab_size)), -1, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set to -inf, in `logits` (N, V) float, every token that `bitmask` (M, W) does not allow
    in row `rows[j]` (M,) of `logits` for bitmask row j."""
    vocab = logits.shape[1]
    bitmask = bitmask.to(logits.device, non_blocking=True)
    bits = _BITS.to(logits.device)
    allowed = (bitmask.unsqueeze(-1) >> bits) & 1  # (M, W, 32)
    allowed = allowed.view(bitmask.shape[0], -1)[:, :vocab].bool()  # (M, V)
    rows = rows.to(logits.device)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
