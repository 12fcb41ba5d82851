"""One prefix-index lookup per request, before routing; falls back to load-only routing.

The lookup asks the index which workers hold the prompt's leading blocks and puts the answer
in the request's `RequestContext.prefix_matches`, where `prefix_aware` reads it. When the index
is unreachable (Redis down), requests still route, by load alone: a metric and one log line say
so, and another when the index answers again.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Gauge, Histogram

from prefix_index.base import IndexUnavailableError, PrefixIndex
from router.policies import RequestContext

log = logging.getLogger(__name__)

DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1)


class PrefixLookup:
    """Fills `ctx.prefix_matches` from `index`; never raises for an unavailable index."""

    def __init__(self, index: PrefixIndex, registry: CollectorRegistry, model: str) -> None:
        self.index = index
        self.available = True
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
        start = time.perf_counter()
        try:
            ctx.prefix_matches = await self.index.match(ctx.block_hashes)
        except IndexUnavailableError as e:
            self._set_available(False, str(e))
            return
        self._seconds.observe(time.perf_counter() - start)
        self._set_available(True)

    def _set_available(self, available: bool, why: str = "") -> None:
        if available == self.available:
            return
        self.available = available
        self._available_gauge.set(1 if available else 0)
        if available:
            log.warning("prefix index is back: prefix-aware routing resumes")
        else:
            log.warning("prefix index unavailable (%s): routing by load only", why)
