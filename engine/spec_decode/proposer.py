"""The drafter interface, the context a model-based drafter gets, and the drafters' registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.config import ModelConfig, SpeculativeConfig
from engine.request import Request


@dataclass(frozen=True, slots=True)
class DrafterContext:
    """What a drafter may need from the engine it drafts for (model-based drafters load their
    weights against it): the target's config, and the device and dtype it runs in."""

    model: ModelConfig
    device: torch.device
    dtype: torch.dtype
    num_blocks: int | None = None  # the target's KV cache blocks (a drafter's cache may match)
    block_size: int = 16  # tokens per KV block
    target_model: torch.nn.Module | None = None  # EAGLE shares its embedding and lm_head
    cuda_graphs: bool = False  # the target decodes through CUDA graphs: a drafter may too
    max_num_seqs: int = 256  # the most sequences a step runs (a graphed drafter's largest batch)


class Proposer(ABC):
    """Proposes draft tokens for requests about to decode."""

    # The target's states per computed position it reads (EAGLE; engine.runner.forward's
    # `keep_states`): None: none; (): the final hidden state; else the residual stream
    # entering these layers, concatenated.
    state_layers: tuple[int, ...] | None = None

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config

    @abstractmethod
    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        """Up to `max_drafts[i]` tokens likely to follow `requests[i].all_token_ids` (may be
        empty: nothing to propose)."""

    def finished(self, request: Request) -> None:  # noqa: B027 (optional hook, no-op by default)
        """`request` ended in this engine (stopped, length, aborted or handed off; its tokens
        are final): a drafter that keeps state per request drops it here."""


ProposerFactory = Callable[[SpeculativeConfig, DrafterContext], Proposer]
_PROPOSERS: dict[str, ProposerFactory] = {}


def register_proposer(method: str, factory: ProposerFactory) -> None:
    """Make `speculative_config.method == method` build its drafter with `factory` (the
    method must also be one `SpeculativeConfig` accepts)."""
    _PROPOSERS[method] = factory


def _ngram(config: SpeculativeConfig, context: DrafterContext) -> Proposer:
    from engine.spec_decode.ngram import NgramProposer

    return NgramProposer(config)


def _suffix(config: SpeculativeConfig, context: DrafterContext) -> Proposer:
    from engine.spec_decode.suffix import SuffixProposer

    return SuffixProposer(config)


def _mlp_speculator(config: SpeculativeConfig, context: DrafterContext) -> Proposer:
    from engine.spec_decode.mlp_speculator import MlpSpeculatorProposer

    return MlpSpeculatorProposer(config, context)


def _draft_model(config: SpeculativeConfig, context: DrafterContext) -> Proposer:
    from engine.spec_decode.draft_model import DraftModelProposer

    return DraftModelProposer(config, context)


def _eagle(config: SpeculativeConfig, context: DrafterContext) -> Proposer:
    from engine.spec_decode.eagle import EagleProposer

    return EagleProposer(config, context, eagle3=config.method == "eagle3")


register_proposer("ngram", _ngram)
register_proposer("suffix", _suffix)
register_proposer("mlp_speculator", _mlp_speculator)
register_proposer("draft_model", _draft_model)
register_proposer("eagle", _eagle)
register_proposer("eagle3", _eagle)


def build_proposer(config: SpeculativeConfig, context: DrafterContext) -> Proposer:
    """The drafter of `config.method`, for the target described by `context`. ValueError
    (naming the field) for a method without a drafter, or a drafter's bad weights."""
    factory = _PROPOSERS.get(config.method)
    if factory is None:
        raise ValueError(f"speculative_config.method {config.method!r} is not implemented yet")
    return factory(config, context)
