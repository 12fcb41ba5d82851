"""Repetition, frequency and presence penalties (vLLM / OpenAI semantics), batched.

- repetition (CTRL, Keskar et al. 2019): for every token seen in prompt or output, a positive
  logit is divided by the penalty and a negative one multiplied by it;
- frequency: subtract penalty x (times the token appears in the output);
- presence: subtract penalty x (1 if the token appears in the output).
"""

from __future__ import annotations

import torch

from engine.sampling.metadata import Penalties, TokenPairs


def token_counts(pairs: TokenPairs, num_rows: int, vocab_size: int) -> torch.Tensor:
    """How many times each token occurs in each row: (num_rows, vocab_size) int32."""
    counts = torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=pairs.rows.device)
    ones = torch.ones_like(pairs.rows, dtype=torch.int32)
    counts.index_put_((pairs.rows, pairs.tokens), ones, accumulate=True)
    return counts


def apply_penalties(logits: torch.Tensor, penalties: Penalties) -> None:
    """Apply the three penalties to `logits` (N, V) float32, in place."""
    num_rows, vocab_size = logits.shape
    output_counts = token_counts(penalties.output_tokens, num_rows, vocab_size)  # (N, V)
    output_mask = output_counts > 0  # (N, V)
    if penalties.prompt_tokens is not None:
        seen = output_mask.clone()
        seen[penalties.prompt_tokens.rows, penalties.prompt_tokens.tokens] = True
        _apply_repetition(logits, seen, penalties.repetition)
    logits -= penalties.frequency.unsqueeze(1) * output_counts
    logits -= penalties.presence.unsqueeze(1) * output_mask


def _apply_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> None:
    factor = torch.where(seen, penalty.unsqueeze(1), 1.0)  # (N, V)
    logits.copy_(torch.where(logits > 0, logits / factor, logits * factor))
