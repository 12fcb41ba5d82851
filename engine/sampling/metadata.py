"""Per-step sampling inputs: one `SamplingRow` per logits row, batched into tensors once.

A row is one request sampling one token this step. Nothing here assumes one row per request:
to verify several draft tokens of a request in one step (rejection sampling), build one row per
draft position, each with its `output_token_ids` extended by the drafts before it.

Per-token inputs (allowed ids, logit bias, min_tokens bans, penalty counts) are kept sparse as
(row, token) index pairs, so a step costs O(tokens named) to build, not O(rows x vocab); each
is None when no row needs it, and the sampler then skips that transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from engine.sampling_params import SamplingParams, SamplingType


@dataclass(slots=True)
class SamplingRow:
    """One logits row: a request sampling one token this step.

    `generator` is the request's own RNG (from `params.seed`), None = the global RNG.
    `eos_token_ids` are the model's EOS ids, banned while fewer than `params.min_tokens`
    tokens are generated (unless `params.ignore_eos`).
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]  # generated before this step
    generator: torch.Generator | None
    eos_token_ids: Sequence[int]


@dataclass(slots=True)
class TokenPairs:
    """Sparse (row, token) positions in a (N, V) logits tensor."""

    rows: torch.Tensor  # (K,) int64
    tokens: torch.Tensor  # (K,) int64

    @classmethod
    def build(cls, per_row: Sequence[Sequence[int]], device: torch.device) -> TokenPairs:
        """Pairs for `per_row[i]` = the token ids of row i (duplicates kept)."""
        lengths = torch.tensor([len(ids) for ids in per_row], dtype=torch.long)
        rows = torch.repeat_interleave(torch.arange(len(per_row)), lengths)
        tokens = torch.tensor(list(chain.from_iterable(per_row)), dtype=torch.long)
        return cls(rows.to(device), tokens.to(device))


@dataclass(slots=True)
class AllowedTokens:
    """Rows restricted to a set of token ids; every other token of those rows gets -inf."""

    rows: torch.Tensor  # (M,) int64, the restricted rows
    allowed: TokenPairs


@dataclass(slots=True)
class LogitBias:
    """Additive biases at sparse (row, token) positions."""

    pairs: TokenPairs
    values: torch.Tensor  # (K,) float32


@dataclass(slots=True)
class Penalties:
    """Inputs of the repetition / frequency / presence penalties; neutral for rows without."""

    presence: torch.Tensor  # (N,) float32, 0 = off
    frequency: torch.Tensor  # (N,) float32, 0 = off
    repetition: torch.Tensor  # (N,) float32, 1 = off
    output_tokens: TokenPairs  # every generated token of every row (repeats counted)
    prompt_tokens: TokenPairs | None  # None when no row has a repetition penalty


@dataclass(slots=True)
class SamplingMetadata:
    """Batched sampling inputs for N rows over a vocab of V tokens; built by `build`.

    Tensors for a transform no row uses are None. Greedy rows hold neutral random-sampling
    values (temperature 1, no top-k/top-p/min-p) since their random draw is discarded.
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None  # (N,) bool; None when all rows are greedy or all random
    temperature: torch.Tensor | None  # (N,) float32; None when all rows are greedy
    top_k: torch.Tensor | None  # (N,) int64 in [1, V], V = off; None when no row uses it
    top_p: torch.Tensor | None  # (N,) float32, 1 = off; None when no row uses it
    min_p: torch.Tensor | None  # (N,) float32, 0 = off; None when no row uses it
    generators: dict[int, torch.Generator]  # row index -> RNG, random rows with a seed only
    max_num_logprobs: int | None  # top logprobs per row (V for -1); None = no row asked
    allowed_tokens: AllowedTokens | None
    logit_bias: LogitBias | None
    min_tokens_bans: TokenPairs | None  # stop/eos ids banned until min_tokens is reached
    penalties: Penalties | None

    @classmethod
    def build(
        cls, rows: Sequence[SamplingRow], vocab_size: int, device: torch.device
    ) -> SamplingMetadata:
        """Batch `rows` (in logits-row order) for a vocab of `vocab_size` tokens on `device`."""
        params = [row.params for row in rows]
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)
        temperature = [1.0 if g else p.temperature for g, p in zip(greedy, params, strict=True)]
        return cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=(None if all_greedy or all_random else torch.tensor(greedy, device=device)),
            temperature=None if all_greedy else _floats(temperature, device),
            top_k=_build_top_k(params, vocab_size, device),
            top_p=_build_optional([p.top_p for p in params], 1.0, device),
            min_p=_build_optional([p.min_p for p in params], 0.0, device),
            generators={
                i: row.generator
                for i, (row, g) in enumerate(zip(rows, greedy, strict=True))
                if row.generator is not None and not g
            },
            max_num_logprobs=_max_num_logprobs(params, vocab_size),
            allowed_tokens=_build_allowed(params, device),
            logit_bias=_build_logit_bias(params, device),
            min_tokens_bans=_build_min_tokens_bans(rows, device),
            penalties=_build_penalties(rows, device),
        )


def _floats(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _build_optional(
    values: Sequence[float], off: float, device: torch.device
) -> torch.Tensor | None:
    """`values` as a tensor, or None when every row has the `off` value."""
    return None if all(v == off for v in values) else _floats(values, device)


def _build_top_k(
    params: Sequence[SamplingParams], vocab_size: int, device: torch.device
) -> torch.Tensor | None:
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    if all(k == vocab_size for k in top_k):
        return None
    return torch.tensor(top_k, dtype=torch.long, device=device)


def _max_num_logprobs(params: Sequence[SamplingParams], vocab_size: int) -> int | None:
    requested = [
        vocab_size if p.logprobs == -1 else p.logprobs for p in params if p.logprobs is not None
    ]
    return max(requested) if requested else None


def _build_allowed(params: Sequence[SamplingParams], device: torch.device) -> AllowedTokens | None:
    restricted = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if not restricted:
        return None
    per_row = [p.allowed_token_ids or [] for p in params]
    rows = torch.tensor(restricted, dtype=torch.long, device=device)
    return AllowedTokens(rows=rows, allowed=TokenPairs.build(per_row, device))


def _build_logit_bias(params: Sequence[SamplingParams], device: torch.device) -> LogitBias | None:
    biases = [p.logit_bias or {} for p in params]
    if not any(biases):
        return None
    pairs = TokenPairs.build([list(b) for b in biases], device)
    values = _floats(list(chain.from_iterable(b.values() for b in biases)), device)
    return LogitBias(pairs=pairs, values=values)


def _build_min_tokens_bans(rows: Sequence[SamplingRow], device: torch.device) -> TokenPairs | None:
    per_row: list[list[int]] = []
    for row in rows:
        p = row.params
        if len(row.output_token_ids) >= p.min_tokens:
            per_row.append([])
            continue
        eos = [] if p.ignore_eos else list(row.eos_token_ids)
        per_row.append(sorted(set(eos).union(p.stop_token_ids or [])))
    if not any(per_row):
        return None
    return TokenPairs.build(per_row, device)


def _build_penalties(rows: Sequence[SamplingRow], device: torch.device) -> Penalties | None:
    params = [row.params for row in rows]
    any_repetition = any(p.repetition_penalty != 1.0 for p in params)
    if not any_repetition and all(
        p.presence_penalty == 0.0 and p.frequency_penalty == 0.0 for p in params
    ):
        return None
    return Penalties(
        presence=_floats([p.presence_penalty for p in params], device),
        frequency=_floats([p.frequency_penalty for p in params], device),
        repetition=_floats([p.repetition_penalty for p in params], device),
        output_tokens=TokenPairs.build([row.output_token_ids for row in rows], device),
        prompt_tokens=(
            TokenPairs.build([row.prompt_token_ids for row in rows], device)
            if any_repetition
            else None
        ),
    )
