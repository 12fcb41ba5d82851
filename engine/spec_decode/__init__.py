"""Speculative decoding: a drafter proposes tokens, the target verifies them in one pass.

    step k:   request ... t  --drafter-->  drafts d1..dk                 (Proposer.propose)
    step k+1: the target computes [t, d1..dk] (k + 1 rows, each sampled)  (runner.inputs)
              accepted = the drafts the target agrees with, then one more token of its own
              (greedy: argmax equality; sampling: rejection sampling)     (spec_decode.verify)
              KV of the rejected drafts is dropped: num_computed_tokens counts the accepted
              ones, and blocks past them go back (KVCacheManager.trim)

Methods: `ngram` (prompt lookup), `suffix` (suffix decoding: the request's tokens and earlier
outputs), `mlp_speculator` (IBM's MLP heads over the target's last hidden state; trained by
`baton train-speculator`, engine.spec_decode.train_mlp), `draft_model`, `eagle` / `eagle3`
(engine.spec_decode.eagle: a head over the target's states). A drafter
gets a `DrafterContext` (the target's config, device, dtype); `register_proposer` adds one.
"""

from engine.spec_decode.proposer import (
    DrafterContext,
    Proposer,
    build_proposer,
    register_proposer,
)
from engine.spec_decode.stats import SpecDecodeLogger, SpecDecodeStats

__all__ = [
    "DrafterContext",
    "Proposer",
    "SpecDecodeLogger",
    "SpecDecodeStats",
    "build_proposer",
    "register_proposer",
]
