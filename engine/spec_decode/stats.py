"""Counts of drafted and accepted tokens, named like vLLM's spec-decode metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("baton.spec_decode")


@dataclass(slots=True)
class SpecDecodeStats:
    """Since start: verify passes with drafts (`num_drafts`), tokens drafted and accepted, and
    accepted tokens by draft position (position 0 = the first draft)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_pos) < num_draft_tokens:
            self.accepted_per_pos.extend([0] * (num_draft_tokens - len(self.accepted_per_pos)))
        for pos in range(num_accepted):
            self.accepted_per_pos[pos] += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens per verify pass: the accepted drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0


class SpecDecodeLogger:
    """Logs the acceptance since the last line, every `interval_s` while drafts are verified
    (vLLM's periodic "SpecDecoding metrics" line): mean acceptance length, draft acceptance
    rate, and the acceptance rate by draft position."""

    def __init__(self, stats: SpecDecodeStats, interval_s: float = 10.0) -> None:
        self.stats = stats
        self.interval_s = interval_s
        self._last = time.monotonic()
        self._seen = SpecDecodeStats()

    def maybe_log(self) -> str | None:
        """The line logged now, or None (too soon, or nothing drafted since)."""
        now = time.monotonic()
        stats, seen = self.stats, self._seen
        drafts = stats.num_drafts - seen.num_drafts
        if now - self._last < self.interval_s or drafts == 0:
            return None
        tokens = stats.num_draft_tokens - seen.num_draft_tokens
        accepted = stats.num_accepted_tokens - seen.num_accepted_tokens
        per_pos = [
            (n - (seen.accepted_per_pos[i] if i < len(seen.accepted_per_pos) else 0)) / drafts
            for i, n in enumerate(stats.accepted_per_pos)
        ]
        line = (
            f"SpecDecoding metrics: mean acceptance length {1 + accepted / drafts:.2f}, "
            f"accepted {accepted}/{tokens} draft tokens ({accepted / max(tokens, 1):.1%}), "
            f"per-position acceptance rate {', '.join(f'{r:.3f}' for r in per_pos)}"
        )
        logger.info(line)
        self._last = now
        self._seen = SpecDecodeStats(
            stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
            list(stats.accepted_per_pos),
        )  # fmt: skip
        return line
