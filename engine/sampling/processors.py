"""Logits transforms that run before greedy or random sampling, in vLLM v1's order.

Each takes (logits, part of the metadata) and edits the (N, V) float32 logits in place, one row
per `SamplingRow`, so a caller may pass several rows per request (draft verification). A future
structured-output token bitmask belongs first in `apply_logits_processors`, before the others.
"""

from __future__ import annotations

import torch

from engine.sampling.metadata import AllowedTokens, LogitBias, SamplingMetadata, TokenPairs
from engine.sampling.penalties import apply_penalties


def apply_allowed_tokens(logits: torch.Tensor, allowed: AllowedTokens) -> None:
    """Set every token of a restricted row to -inf except its allowed ones."""
    pairs = allowed.allowed
    kept = logits[pairs.rows, pairs.tokens]  # (K,)
    logits.index_fill_(0, allowed.rows, float("-inf"))
    logits[pairs.rows, pairs.tokens] = kept


def apply_logit_bias(logits: torch.Tensor, bias: LogitBias) -> None:
    """Add each row's logit_bias values to their tokens."""
    logits.index_put_((bias.pairs.rows, bias.pairs.tokens), bias.values, accumulate=True)


def apply_token_bans(logits: torch.Tensor, bans: TokenPairs) -> None:
    """Set the banned (row, token) positions to -inf (min_tokens: eos and stop ids)."""
    logits[bans.rows, bans.tokens] = float("-inf")


def apply_logits_processors(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """Allowed ids, logit bias, min_tokens bans, then penalties, each only if some row uses it."""
    if metadata.allowed_tokens is not None:
        apply_allowed_tokens(logits, metadata.allowed_tokens)
    if metadata.logit_bias is not None:
        apply_logit_bias(logits, metadata.logit_bias)
    if metadata.min_tokens_bans is not None:
        apply_token_bans(logits, metadata.min_tokens_bans)
    if metadata.penalties is not None:
        apply_penalties(logits, metadata.penalties)
