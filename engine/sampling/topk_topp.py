"""Random sampling: temperature, min-p / top-k / top-p truncation, then one draw per row.

The draw is the exponential race (Gumbel-max in another form): with q_i ~ Exp(1),
argmax_i(p_i / q_i) is distributed as p. It needs no cumulative sum, and each seeded row draws
exactly V values from its own generator per step, so its tokens do not depend on the batch.
"""

from __future__ import annotations

import torch


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> None:
    """Divide each row of `logits` (N, V) by its temperature (N,), in place."""
    logits.div_(temperature.unsqueeze(1))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Mask tokens whose probability is below min_p x the row's top probability, in place."""
    probs = torch.softmax(logits, dim=-1)  # (N, V)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # (N, 1)
    logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Keep each row's top_k logits (ties at the k-th value kept) and its smallest set of most
    likely tokens whose probability mass reaches top_p; mask the rest with -inf.

    top_k (N,) int64 in [1, V], V = off; top_p (N,) float32, 1 = off. May edit `logits`.
    """
    if top_p is None:
        if top_k is not None:
            _apply_top_k_only(logits, top_k)
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # (N, V) ascending
    if top_k is not None:
        kth = sorted_logits.gather(1, (logits.shape[1] - top_k).unsqueeze(1))  # (N, 1)
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    cumulative = sorted_logits.softmax(dim=-1).cumsum_(dim=-1)  # (N, V) from the least likely
    outside = cumulative <= (1 - top_p).unsqueeze(1)
    outside[:, -1] = False  # always keep the most likely token
    sorted_logits.masked_fill_(outside, float("-inf"))
    return sorted_logits.scatter(dim=-1, index=order, src=sorted_logits)


def _apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor) -> None:
    # A partial topk avoids sorting the whole vocab when only top-k is in use.
    vocab_size = logits.shape[1]
    off = top_k == vocab_size  # (N,)
    k = top_k.masked_fill(off, 1)
    kth = logits.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # (N, 1)
    kth.masked_fill_(off.unsqueeze(1), float("-inf"))
    logits.masked_fill_(logits < kth, float("-inf"))


def random_sample(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One token per row of `probs` (N, V): argmax(probs / q), q ~ Exp(1). Rows in
    `generators` draw q from their own generator, the others from the global RNG. (N,) int64."""
    q = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        q.exponential_()
    for row, generator in generators.items():
        q[row] = _exponential(probs.shape[1], generator, probs.device)
    return probs.div_(q).argmax(dim=-1)


def _exponential(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    # Draw on the generator's own device (the engine may keep CPU generators for GPU logits).
    q = torch.empty(n, device=generator.device).exponential_(generator=generator)
    return q.to(device, non_blocking=True)


def advance_generator(generator: torch.Generator, vocab_size: int, steps: int = 1) -> None:
    """Consume what `steps` sampling steps draw from a seeded row's generator.

    A decode engine that continues a request sampled elsewhere (disaggregated prefill) calls
    this so its seeded draws line up with a single engine's.
    """
    for _ in range(steps):
        _exponential(vocab_size, generator, generator.device)
