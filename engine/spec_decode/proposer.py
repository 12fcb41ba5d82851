"""The drafter interface, and the drafter of a `SpeculativeConfig`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from engine.config import SpeculativeConfig
from engine.request import Request


class Proposer(ABC):
    """Proposes draft tokens for requests about to decode."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    @abstractmethod
    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        """Up to `max_drafts[i]` tokens likely to follow `requests[i].all_token_ids` (may be
        empty: nothing to propose)."""

    def finished(self, request: Request) -> None:  # noqa: B027 (optional hook, no-op by default)
        """`request` ended in this engine (stopped, length, aborted or handed off; its tokens
        are final): a drafter that keeps state per request drops it here."""


def build_proposer(config: SpeculativeConfig) -> Proposer:
    if config.method == "ngram":
        from engine.spec_decode.ngram import NgramProposer

        return NgramProposer(config)
    if config.method == "suffix":
        from engine.spec_decode.suffix import SuffixProposer

        return SuffixProposer(config)
    raise ValueError(f"speculative_config.method {config.method!r} is not implemented yet")
