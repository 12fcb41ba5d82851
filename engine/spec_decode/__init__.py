"""Speculative decoding: a drafter proposes tokens, the target verifies them in one pass.

    step k:   request ... t  --drafter-->  drafts d1..dk                 (Proposer.propose)
    step k+1: the target computes [t, d1..dk] (k + 1 rows, each sampled)  (runner.inputs)
              accepted = the drafts the target agrees with, then one more token of its own
              (greedy: argmax equality; sampling: rejection sampling)     (spec_decode.verify)
              KV of the rejected drafts is dropped: num_computed_tokens counts the accepted
              ones, and blocks past them go back (KVCacheManager.trim)

Methods: `ngram` (prompt lookup), `suffix` (suffix decoding: the request's tokens and earlier
outputs). Next: MLP speculators, EAGLE, draft models.
"""

from engine.spec_decode.proposer import Proposer, build_proposer
from engine.spec_decode.stats import SpecDecodeLogger, SpecDecodeStats

__all__ = ["Proposer", "SpecDecodeLogger", "SpecDecodeStats", "build_proposer"]
