"""Logprobs as the user sees them: vLLM's `Logprob` and its per-position dicts.

Torch-free: the engine turns its tensors into these (`engine.sampling.logprobs`), the router turns
the workers' `TokenLogprobs` messages into the same, with the same `to_logprob_dict`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class Logprob:
    """One token's logprob as returned to the user (vLLM's `Logprob`)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position: token id -> Logprob (the sampled/target token plus the top-k).
TokenLogprobDict = dict[int, Logprob]
# One dict per generated token.
SampleLogprobs = list[TokenLogprobDict]
# One dict per prompt position; the first prompt token has none.
PromptLogprobs = list[TokenLogprobDict | None]


class _ListLike(Protocol):
    def tolist(self) -> Any: ...


def to_logprob_dict(
    token_ids_row: _ListLike | Sequence[int],
    logprobs_row: _ListLike | Sequence[float],
    sampled_rank: int,
    num_requested: int,
    decode: Callable[[int], str] | None,
) -> TokenLogprobDict:
    """One row (sampled/target token, then the top ones) as vLLM's {token_id: Logprob}: the
    sampled/target token (with `sampled_rank`) first, then the top `num_requested` (-1 = all
    columns) ranked 1, 2, ... Rows are sequences or anything with `tolist()` (a tensor row).

    If the sampled token is also in the top entries, its top-k entry wins, as in vLLM.
    """
    ids = _as_list(token_ids_row)
    values = _as_list(logprobs_row)
    count = len(ids) if num_requested == -1 else min(1 + num_requested, len(ids))
    ranks = [sampled_rank, *range(1, count)]
    return {
        int(tok): Logprob(
            logprob=float(lp), rank=rank, decoded_token=decode(int(tok)) if decode else None
        )
        for tok, lp, rank in zip(ids[:count], values[:count], ranks, strict=True)
    }


def _as_list(values: _ListLike | Sequence[Any]) -> list[Any]:
    tolist = getattr(values, "tolist", None)
    return tolist() if tolist is not None else list(values)  # type: ignore[arg-type]
