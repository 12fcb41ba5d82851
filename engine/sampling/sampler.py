"""The batched sampler: one next token per logits row, in vLLM v1's order.

    logits (N, V) --log_softmax--> raw logprobs (returned if asked)
       |
       +-- allowed ids -> logit bias -> min_tokens bans -> penalties   (processors.py)
       |
       +-- greedy rows: argmax
       +-- random rows: / temperature -> min_p -> top_k -> top_p -> softmax -> exponential race

The caller's logits are left untouched; every transform works on one float32 copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sampling.logprobs import LogprobsTensors, gather_logprobs
from engine.sampling.metadata import SamplingMetadata
from engine.sampling.processors import apply_logits_processors
from engine.sampling.topk_topp import (
    apply_min_p,
    apply_temperature,
    apply_top_k_top_p,
    random_sample,
)


@dataclass(slots=True)
class SamplerOutput:
    """The tokens sampled this step, one per logits row, and their logprobs if any row asked."""

    sampled_token_ids: torch.Tensor  # (N,) int64
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


class Sampler:
    """Samples one token per row of (N, V) logits according to `SamplingMetadata`."""

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Sample from `logits` (N, V), the model's raw output for the N rows of `metadata`."""
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        logits = logits.to(torch.float32, copy=True)
        apply_logits_processors(logits, metadata)
        sampled = self.sample(logits, metadata)
        logprobs = None
        if raw_logprobs is not None and metadata.max_num_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Greedy or random token per row of processed `logits` (N, V), which it may edit.
        Returns (N,) int64."""
        greedy = None if metadata.all_random else logits.argmax(dim=-1)
        if greedy is not None and metadata.all_greedy:
            return greedy
        sampled = self.sample_random(logits, metadata)
        if greedy is None or metadata.greedy_mask is None:
            return sampled
        return torch.where(metadata.greedy_mask, greedy, sampled)

    def sample_random(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Temperature, min_p, top_k, top_p, then one random draw per row; edits `logits`."""
        assert metadata.temperature is not None
        apply_temperature(logits, metadata.temperature)
        if metadata.min_p is not None:
            apply_min_p(logits, metadata.min_p)
        logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
        probs = torch.softmax(logits, dim=-1)  # (N, V)
        return random_sample(probs, metadata.generators)
