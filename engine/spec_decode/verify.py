"""Verifying drafts: k + 1 logits rows per request, the drafts accepted, one token more.

Row j of a request that drafted d_1..d_k scores the token after its tokens and d_1..d_j (row 0:
after its own tokens). Each row is processed as the sampler would (penalties see the drafts
before it as output tokens; temperature, min_p, top_k, top_p), giving the target's distribution
p_j at that position.

    greedy:    accept d_{j+1} while it is argmax p_j; then the argmax of the first row not
               matched (the bonus row p_k when every draft was accepted)
    sampling:  rejection sampling (Leviathan et al., 2023) with a deterministic drafter (q a
               point mass at d_{j+1}): accept d_{j+1} with probability p_j(d_{j+1}); at the
               first rejection sample from p_j without d_{j+1} (max(p - q, 0), normalized),
               else from p_k. Each output token is so distributed exactly as the target's.

A request's uniforms and its final draw come from its own generator when seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.sampling_params import SamplingType
from engine.sampling.metadata import SamplingMetadata, SamplingRow
from engine.sampling.processors import apply_logits_processors
from engine.sampling.topk_topp import (
    apply_min_p,
    apply_temperature,
    apply_top_k_top_p,
    random_sample,
)
from engine.scheduler.output import ScheduledRequest


@dataclass(slots=True)
class Verified:
    """Per item (in order): the drafts it accepted, and the token that follows them."""

    accepted: list[list[int]]
    tokens: list[int]


def verify(
    logits: torch.Tensor,  # (R, V): 1 + len(drafts) consecutive rows per item
    items: list[ScheduledRequest],
    vocab_size: int,
) -> Verified:
    starts = _row_starts(items)
    if all(it.request.plain_greedy for it in items):
        return _greedy(logits.argmax(dim=-1).tolist(), items, starts)
    rows = [row for it in items for row in _sampling_rows(it)]
    meta = SamplingMetadata.build(rows, vocab_size, logits.device)
    processed = logits.to(torch.float32, copy=True)
    apply_logits_processors(processed, meta)
    argmax = processed.argmax(dim=-1).tolist()
    if meta.all_greedy:
        return _greedy(argmax, items, starts)
    probs = _probabilities(processed, meta)  # (R, V); greedy rows are never read
    return _rejection(probs, argmax, items, starts)


def _row_starts(items: list[ScheduledRequest]) -> list[int]:
    starts, at = [], 0
    for it in items:
        starts.append(at)
        at += 1 + len(it.draft_token_ids)
    return starts


def _sampling_rows(item: ScheduledRequest) -> list[SamplingRow]:
    request, drafts = item.request, item.draft_token_ids
    outputs = request.output_token_ids
    return [
        SamplingRow(
            params=request.params,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=outputs if j == 0 else [*outputs, *drafts[:j]],
            generator=request.generator,
            eos_token_ids=request.eos_token_ids,
        )
        for j in range(len(drafts) + 1)
    ]


def _greedy(argmax: list[int], items: list[ScheduledRequest], starts: list[int]) -> Verified:
    out = Verified([], [])
    for it, start in zip(items, starts, strict=True):
        drafts = it.draft_token_ids
        n = 0
        while n < len(drafts) and argmax[start + n] == drafts[n]:
            n += 1
        out.accepted.append(drafts[:n])
        out.tokens.append(argmax[start + n])
    return out


def _probabilities(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The target's distribution per row: temperature, min_p, top_k, top_p, softmax."""
    assert meta.temperature is not None
    apply_temperature(logits, meta.temperature)
    if meta.min_p is not None:
        apply_min_p(logits, meta.min_p)
    logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    return torch.softmax(logits, dim=-1)


def _rejection(
    probs: torch.Tensor, argmax: list[int], items: list[ScheduledRequest], starts: list[int]
) -> Verified:
    out = Verified([], [])
    draft_rows = [start + j for it, start in zip(items, starts, strict=True)
                  for j in range(len(it.draft_token_ids))]  # fmt: skip
    draft_ids = [d for it in items for d in it.draft_token_ids]
    at = torch.tensor(draft_rows, dtype=torch.long, device=probs.device)
    ids = torch.tensor(draft_ids, dtype=torch.long, device=probs.device)
    p_draft = probs[at, ids].tolist()  # p_j(d_{j+1}) for every draft, in order
    final_rows: list[int] = []  # per random item: the row its last token is drawn from
    banned: list[int] = []  # ... and the rejected draft banned there (-1: none)
    generators: dict[int, torch.Generator] = {}
    seen = 0
    for it, start in zip(items, starts, strict=True):
        drafts, request = it.draft_token_ids, it.request
        p = p_draft[seen : seen + len(drafts)]
        seen += len(drafts)
        if request.params.sampling_type == SamplingType.GREEDY:  # greedy, in a mixed batch
            n = next((j for j, d in enumerate(drafts) if argmax[start + j] != d), len(drafts))
            out.accepted.append(drafts[:n])
            out.tokens.append(argmax[start + n])
            continue
        uniform = torch.rand(len(drafts), generator=request.generator).tolist()
        n = next((j for j, (u, q) in enumerate(zip(uniform, p, strict=True)) if u >= q), None)
        out.accepted.append(drafts if n is None else drafts[:n])
        out.tokens.append(-1)  # drawn below
        if request.generator is not None:
            generators[len(final_rows)] = request.generator
        final_rows.append(start + (len(drafts) if n is None else n))
        banned.append(-1 if n is None else drafts[n])
    if final_rows:
        final = probs[torch.tensor(final_rows, device=probs.device)]  # (M, V) a copy
        for m, token in enumerate(banned):
            if token >= 0:
                final[m, token] = 0.0  # the residual max(p - q, 0): q is a point mass
        drawn = iter(random_sample(final, generators).tolist())
        out.tokens = [next(drawn) if t == -1 else t for t in out.tokens]
    return out
