"""Logprobs of sampled and prompt tokens, as tensors (their user-facing form is
`common.logprobs`: `Logprob`, `to_logprob_dict`, re-exported here).

Logprobs are "raw", as vLLM's default: log_softmax of the model's logits before any penalty,
bias, temperature or truncation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.logprobs import Logprob, to_logprob_dict

__all__ = [
    "Logprob",
    "LogprobsTensors",
    "compute_prompt_logprobs",
    "gather_logprobs",
    "to_logprob_dict",
]


@dataclass(slots=True)
class LogprobsTensors:
    """Per row: the sampled/target token then the top-k tokens, with their logprobs.

    Rows that asked for fewer than k top logprobs are sliced by the caller.
    """

    token_ids: torch.Tensor  # (N, 1 + k) int64, column 0 = sampled/target token
    logprobs: torch.Tensor  # (N, 1 + k) float32
    ranks: torch.Tensor  # (N,) int64, rank of the sampled/target token (1 = most likely)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> LogprobsTensors:
    """Select from `logprobs` (N, V) each row's `token_ids` (N,) entry and its `num_top` best
    (num_top = -1: the whole vocab). Ties rank pessimistically: rank = #tokens with logprob >=."""
    vocab_size = logprobs.shape[1]
    k = vocab_size if num_top == -1 else min(num_top, vocab_size)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # (N, k)
    token_ids = token_ids.long().unsqueeze(1)  # (N, 1)
    token_logprobs = logprobs.gather(1, token_ids)  # (N, 1)
    ranks = (logprobs >= token_logprobs).sum(dim=-1)  # (N,)
    return LogprobsTensors(
        token_ids=torch.cat((token_ids, top_ids), dim=1),
        logprobs=torch.cat((token_logprobs, top_logprobs), dim=1),
        ranks=ranks,
    )


def compute_prompt_logprobs(
    logits: torch.Tensor, target_token_ids: torch.Tensor, num_top: int
) -> LogprobsTensors:
    """Logprobs of each next prompt token: `logits` (L, V) at L prompt positions, `target_token_ids`
    (L,) the prompt token that follows each position, `num_top` top entries (-1 = all V)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return gather_logprobs(logprobs, target_token_ids, num_top)
