"""Shared-prefix multi-tenant workload: K system prompts with Zipf popularity, distinct questions.

Tenant k (k = 0..K-1) owns a system prompt of `prefix_len` token ids; each request picks a
tenant with probability

    P(k) = (k + 1)^-s / sum_j (j + 1)^-s          (Zipf, exponent s = `zipf_s`; s = 0: uniform)

so tenant 0 is the most popular, and appends a question of its own (`question_len` tokens,
spread by +/- `range_ratio`). Questions are drawn independently, so prompts share exactly their
tenant's system prompt (a collision of a whole 16-token block is vanishingly unlikely). This is
the workload where prefix-aware routing pays: repeats of a tenant's prefix hit the KV cache of
the worker that already served it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.synthetic import (
    PREFIX_STREAM,
    random_token_ids,
    request_rng,
    substream,
    uniform_lengths,
)
from bench.workload import BenchRequest, require_vocab


def zipf_probabilities(num_items: int, exponent: float) -> np.ndarray:
    """P(k) proportional to (k + 1)^-exponent, for k = 0..num_items-1; sums to 1."""
    if num_items < 1 or exponent < 0:
        raise ValueError(f"zipf needs num_items >= 1 and exponent >= 0: {num_items}, {exponent}")
    weights = np.arange(1, num_items + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


@dataclass(slots=True)
class SharedPrefix:
    """`num_prefixes` tenants' system prompts (`prefix_len` tokens each) + distinct questions."""

    num_prefixes: int = 8
    prefix_len: int = 512
    question_len: int = 64
    output_len: int = 64
    zipf_s: float = 1.0
    range_ratio: float = 0.0
    name: str = "prefix"

    def generate(self, num_requests: int, seed: int, vocab_size: int | None) -> list[BenchRequest]:
        vocab = require_vocab(vocab_size, self.name)
        rng = np.random.default_rng(seed)
        prefixes = [
            random_token_ids(substream(seed, PREFIX_STREAM, k), self.prefix_len, vocab)
            for k in range(self.num_prefixes)
        ]
        probs = zipf_probabilities(self.num_prefixes, self.zipf_s)
        tenants = rng.choice(self.num_prefixes, size=num_requests, p=probs)
        questions = uniform_lengths(rng, self.question_len, self.range_ratio, num_requests)
        outputs = uniform_lengths(rng, self.output_len, self.range_ratio, num_requests)
        return [
            BenchRequest(
                index=i,
                prompt=prefixes[k] + random_token_ids(request_rng(seed, i), int(q), vocab),
                max_tokens=int(out),
                tenant=f"tenant-{k}",
            )
            for i, (k, q, out) in enumerate(zip(tenants, questions, outputs, strict=True))
        ]

    def describe(self) -> dict[str, Any]:
        return asdict(self)
