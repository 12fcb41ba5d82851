"""The batch's allowed-token bitmask: built on the host, applied to the logits before sampling.

    bitmask (N, cdiv(V, 32)) int32: bit b of word w of row i set <=> token 32 * w + b allowed

Applied by xgrammar's kernels (any backend fills the same layout): a Triton kernel on the GPU,
C++ on the CPU. On the GPU the host fills pinned memory and its copy is asynchronous.
"""

from __future__ import annotations

import torch


def bitmask_width(vocab_size: int) -> int:
    """Words per row for a vocab of `vocab_size` tokens."""
    return -(-vocab_size // 32)


def allocate_bitmask(num_rows: int, vocab_size: int, pin: bool = False) -> torch.Tensor:
    """(num_rows, cdiv(V, 32)) int32 on the CPU (pinned, with `pin`), every token allowed."""
    width = bitmask_width(vocab_size)
    return torch.full((num_rows, width), -1, dtype=torch.int32, pin_memory=pin)


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: list[int] | None = None
) -> None:
    """Set to -inf, in `logits` (N, V) float32, every token of row i that row i of `bitmask`
    (N, W) does not allow, for the rows in `indices` (all rows if None). `bitmask` may be on
    the host: it is copied to the logits' device (asynchronously from pinned memory)."""
    import xgrammar

    bitmask = bitmask.to(logits.device, non_blocking=True)
    xgrammar.apply_token_bitmask_inplace(
        logits, bitmask, vocab_size=logits.shape[1], indices=indices
    )
