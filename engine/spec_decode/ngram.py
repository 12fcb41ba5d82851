"""N-gram (prompt lookup) drafting: what followed the sequence's final n-gram last time.

For n from `prompt_lookup_max` down to `prompt_lookup_min`, find the latest earlier position
where the last n tokens occurred, and propose the tokens that followed it there. No model, no
state: the request's own tokens (prompt and output) are the draft model. Suited to outputs that
copy from their context (edits, extraction, code, RAG answers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.request import Request
from engine.spec_decode.proposer import Proposer


class NgramProposer(Proposer):
    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        config = self.config
        assert config.prompt_lookup_min is not None and config.prompt_lookup_max is not None
        lo, hi = config.prompt_lookup_min, config.prompt_lookup_max
        return [
            ngram_drafts(request.all_token_ids, lo, hi, k) if k > 0 else []
            for request, k in zip(requests, max_drafts, strict=True)
        ]


def ngram_drafts(tokens: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` of length `max_n` .. `min_n` that occurs earlier; [] when none does."""
    size = len(tokens)
    if size <= min_n:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = arr[size - n :]
        # windows starting at 0 .. size - n - 1: each earlier n-gram with a token after it
        windows = np.lib.stride_tricks.sliding_window_view(arr[: size - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # the latest occurrence; drafts follow it
            return arr[start : start + k].tolist()
    return []
