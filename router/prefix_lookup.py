"""One prefix-index lookup per request, before routing; falls back to load-only routing.

The lookup asks the index which workers hold the prompt's leading blocks and puts the answer
in the request's `RequestContext.prefix_matches`, where `prefix_aware` reads it. The index
learns of new blocks only once a worker computed them and published its events (tens of ms
later), so the lookup also remembers, for `recent_ttl_s` seconds, which worker each prompt was
just routed to (as SGLang's router does with its own tree): a burst of requests sharing a new
prefix then follows the first one instead of scattering. When the index is unreachable (Redis
down), requests still route, by load and that memory: a metric and one log line say so, and
another when the index answers again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Gauge, Histogram

from prefix_index.base import IndexUnavailableError, PrefixIndex
from router.policies import RequestContext
from router.workers import WorkerInfo

log = logging.getLogger(__name__)

DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)


class PrefixLookup:
    """Fills `ctx.prefix_matches` from `index`; never raises for an unavailable index."""

    def __init__(
        self, index: PrefixIndex, registry: CollectorRegistry, model: str, recent_ttl_s: float = 5.0
    ) -> None:
        self.index = index
        self.available = True
        self.recent_ttl_s = recent_ttl_s
        self._recent: dict[str, dict[int, float]] = {}  # worker -> block hash -> expiry
        self._available_gauge = Gauge(
            "baton:prefix_index_available",
            "1 while the prefix index answers, 0 while routing falls back to load only",
            ["model_name"],
            registry=registry,
        ).labels(model)
        self._available_gauge.set(1)
        self._seconds = Histogram(
            "baton:prefix_index_lookup_seconds",
            "Time of one prefix-index match",
            ["model_name"],
            buckets=DECISION_BUCKETS,
            registry=registry,
        ).labels(model)

    async def annotate(self, ctx: RequestContext) -> None:
        if not ctx.block_hashes:
            return
        ctx.on_routed = self.note_routed
        start = time.perf_counter()
        try:
            matches = await self.index.match(ctx.block_hashes)
        except IndexUnavailableError as e:
            self._set_available(False, str(e))
            matches = {}
        else:
            self._seconds.observe(time.perf_counter() - start)
            self._set_available(True)
        for worker, count in self._recent_matches(ctx.block_hashes).items():
            matches[worker] = max(count, matches.get(worker, 0))
        ctx.prefix_matches = matches

    def note_routed(self, worker: WorkerInfo, ctx: RequestContext) -> None:
        """`worker` will hold the prompt's blocks soon: remember them for a while."""
        expiry = time.monotonic() + self.recent_ttl_s
        recent = self._recent.setdefault(worker.address, {})
        for block_hash in ctx.block_hashes:
            recent[block_hash] = expiry

    def _recent_matches(self, block_hashes: Sequence[int]) -> dict[str, int]:
        now = time.monotonic()
        matches = {}
        for worker, recent in self._recent.items():
            count = 0
            while count < len(block_hashes) and recent.get(block_hashes[count], 0.0) > now:
                count += 1
            if count:
                matches[worker] = count
            if len(recent) > 4096:  # prune expired entries now and then
                self._recent[worker] = {h: t for h, t in recent.items() if t > now}
        return matches

    def _set_available(self, available: bool, why: str = "") -> None:
        if available == self.available:
            return
        self.available = available
        self._available_gauge.set(1 if available else 0)
        if available:
            log.warning("prefix index is back: prefix-aware routing resumes")
        else:
            log.warning("prefix index unavailable (%s): routing by load only", why)
