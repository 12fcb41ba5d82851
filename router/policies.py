"""Routing policies: which of the healthy workers of one role gets a request.

A policy sees the candidates (never empty) and a `RequestContext`, which carries the prompt's
block hashes so a prefix-aware policy can match them against a prefix index::

    policy.choose(registry.healthy(Role.DECODE), ctx) -> WorkerInfo

New policies subclass `RoutingPolicy` and register in `POLICIES`.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.block_hash import BlockHash, ExtraKeys, hash_prompt_blocks
from router.workers import Role, WorkerInfo


@dataclass(slots=True)
class RequestContext:
    """What a policy may look at for one worker request.

    `block_hashes` are the prompt's full-block hashes at `block_size` tokens per block, with
    `extra_keys` = (served model name, cache salt), exactly as the workers hash them; empty when
    the workers' block size is not known yet. `hashes_for` gives them for another block size.
    """

    request_id: str
    prompt_token_ids: Sequence[int]
    extra_keys: ExtraKeys
    block_size: int | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)
    priority: int = 0
    tenant: str = ""
    # From the prefix index: worker address -> leading blocks of the prompt it holds.
    prefix_matches: dict[str, int] = field(default_factory=dict)
    # Called with each worker the request is routed to (the prefix lookup remembers it).
    on_routed: Callable[[WorkerInfo, RequestContext], None] | None = None

    def cached_tokens(self, worker: WorkerInfo) -> int:
        """Prompt tokens `worker` already holds, per the prefix index."""
        return self.prefix_matches.get(worker.address, 0) * (self.block_size or 0)

    @classmethod
    def build(
        cls,
        request_id: str,
        prompt_token_ids: Sequence[int],
        extra_keys: ExtraKeys,
        block_size: int | None,
        priority: int = 0,
        tenant: str = "",
    ) -> RequestContext:
        """A context with the prompt's block hashes computed at `block_size` (if known)."""
        hashes = hash_prompt_blocks(prompt_token_ids, block_size, extra_keys) if block_size else []
        return cls(request_id, prompt_token_ids, extra_keys, block_size, hashes, priority, tenant)

    def hashes_for(self, block_size: int) -> list[BlockHash]:
        """The prompt's block hashes at `block_size` tokens per block."""
        if block_size == self.block_size:
            return self.block_hashes
        return hash_prompt_blocks(self.prompt_token_ids, block_size, self.extra_keys)


class RoutingPolicy(ABC):
    """Picks one worker among healthy candidates of one role."""

    name: str = ""
    # Told of each request routed (the router's metrics): the policy's name, the worker taken.
    on_decision: Callable[[str, WorkerInfo, RequestContext], None] | None = None

    def decided(self, worker: WorkerInfo, ctx: RequestContext) -> None:
        """The caller routes the request in `ctx` to `worker`, as `choose` proposed."""
        if self.on_decision is not None:
            self.on_decision(self.name, worker, ctx)

    @abstractmethod
    def choose(self, candidates: Sequence[WorkerInfo], ctx: RequestContext) -> WorkerInfo:
        """One of `candidates` (non-empty, all of one role) for the request in `ctx`."""


class RoundRobinPolicy(RoutingPolicy):
    """Each role's candidates in turn."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counters: dict[Role, itertools.count[int]] = {}

    def choose(self, candidates: Sequence[WorkerInfo], ctx: RequestContext) -> WorkerInfo:
        counter = self._counters.setdefault(candidates[0].role, itertools.count())
        return candidates[next(counter) % len(candidates)]


class LeastLoadedPolicy(RoutingPolicy):
    """Fewest queued requests (waiting + running + just routed), then fewest used KV blocks."""

    name = "least_loaded"

    def choose(self, candidates: Sequence[WorkerInfo], ctx: RequestContext) -> WorkerInfo:
        return min(candidates, key=lambda w: (w.num_queued, w.num_used_blocks))


class PrefixAwarePolicy(RoutingPolicy):
    """The worker holding the longest cached prefix, unless load is imbalanced.

    As SGLang's cache-aware router: while the busiest candidate's queue exceeds the idlest's by
    more than `balance_abs` requests and by a factor over `balance_rel`, route by load alone, so
    a hot prefix cannot pile everything onto one worker. Otherwise take the most cached leading
    blocks; ties (and no hit anywhere) go to the least loaded, then to the lowest address, so
    routers sharing one index make the same choice.
    """

    name = "prefix_aware"

    def __init__(self, balance_abs: int = 4, balance_rel: float = 1.5) -> None:
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel

    def choose(self, candidates: Sequence[WorkerInfo], ctx: RequestContext) -> WorkerInfo:
        by_load = sorted(candidates, key=lambda w: (w.num_queued, w.num_used_blocks, w.address))
        if self.imbalanced(candidates):
            return by_load[0]
        return min(by_load, key=lambda w: -ctx.prefix_matches.get(w.address, 0))

    def imbalanced(self, candidates: Sequence[WorkerInfo]) -> bool:
        queues = [w.num_queued for w in candidates]
        busiest, idlest = max(queues), min(queues)
        return busiest - idlest > self.balance_abs and busiest > self.balance_rel * idlest


POLICIES: dict[str, type[RoutingPolicy]] = {
    RoundRobinPolicy.name: RoundRobinPolicy,
    LeastLoadedPolicy.name: LeastLoadedPolicy,
    PrefixAwarePolicy.name: PrefixAwarePolicy,
}


def make_policy(name: str) -> RoutingPolicy:
    """The policy called `name`; ValueError listing the known ones otherwise."""
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return POLICIES[name]()
