"""The autoscaler's inputs: Prometheus text scraped from the router(s) and the workers.

Read with `prometheus_client.parser`. Latency percentiles come from the router's histograms
as bucket deltas between two scrapes (what `histogram_quantile(0.9, rate(...[interval]))`
computes), so each interval sees only its own requests. Names (vLLM's, under `baton:`):

    router   time_to_first_token_seconds, inter_token_latency_seconds   histograms
    workers  num_requests_running, kv_cache_usage_perc (decode)          gauges, label `role`
             num_prompt_tokens_waiting (prefill)                         gauge

A metric a scrape lacks counts as 0 (a worker that does not export it yet); a target that
cannot be scraped is skipped and logged.
"""

from __future__ import annotations

import logging
import math
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

TTFT = "baton:time_to_first_token_seconds"
ITL = "baton:inter_token_latency_seconds"
RUNNING = "baton:num_requests_running"
KV_USAGE = "baton:kv_cache_usage_perc"
PROMPT_TOKENS_WAITING = "baton:num_prompt_tokens_waiting"

Buckets = dict[float, float]  # upper bound (le) -> cumulative count


def fetch_text(url: str, timeout_s: float = 2.0) -> str:
    """GET `url` (a /metrics endpoint) as text."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return str(response.read().decode())


def histogram_buckets(text: str, name: str) -> Buckets:
    """Cumulative bucket counts of histogram `name`, summed over its label sets."""
    buckets: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return buckets


def gauge_values(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of gauge `name`."""
    return [
        (dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if sample.name == name
    ]


def quantile(q: float, before: Buckets, after: Buckets) -> float | None:
    """The `q` quantile (seconds) of the observations made between two scrapes of one
    histogram, interpolated linearly inside its bucket as Prometheus does; None if there were
    none, or if the counts went backwards (a restarted or different process)."""
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    if any(v < 0 for v in delta.values()):
        return None
    bounds = sorted(delta)
    total = delta[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for le in bounds:
        if delta[le] >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bound: its value, as Prometheus says
            inside = delta[le] - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, delta[le]
    return lower


@dataclass(frozen=True, slots=True)
class Measurements:
    """One scrape's aggregates (the policy's inputs but the replica counts)."""

    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None
    prompt_tokens_waiting: float = 0.0
    kv_usage: float = 0.0  # mean over decode workers
    requests_running: float = 0.0  # decode workers, summed


@dataclass
class MetricsCollector:
    """Scrapes the routers and the workers each interval; remembers the last histograms.

    `worker_urls()` gives the workers' /metrics URLs at each scrape (they come and go)."""

    router_urls: Sequence[str]
    worker_urls: Callable[[], Iterable[str]] = lambda: ()
    fetch: Callable[[str], str] = fetch_text
    quantile: float = 0.9
    _last: dict[tuple[str, str], Buckets] = field(default_factory=dict)

    def collect(self) -> Measurements:
        """Scrape every target once and aggregate."""
        ttft, itl = self._router_quantiles()
        waiting = running = 0.0
        kv: list[float] = []
        for text in self._scrape(self.worker_urls()):
            waiting += sum(v for _, v in gauge_values(text, PROMPT_TOKENS_WAITING))
            for labels, value in gauge_values(text, RUNNING):
                if labels.get("role") == "decode":
                    running += value
            kv += [v for lab, v in gauge_values(text, KV_USAGE) if lab.get("role") == "decode"]
        mean_kv = sum(kv) / len(kv) if kv else 0.0
        return Measurements(ttft, itl, waiting, mean_kv, running)

    def _router_quantiles(self) -> tuple[float | None, float | None]:
        merged: dict[str, list[float]] = {TTFT: [], ITL: []}
        for url in self.router_urls:
            text = self._scrape_one(url)
            if text is None:
                continue
            for name, values in merged.items():
                after = histogram_buckets(text, name)
                before = self._last.get((url, name))
                self._last[(url, name)] = after
                value = None if before is None else quantile(self.quantile, before, after)
                if value is not None:
                    values.append(value)
        # With several routers, the worst one's percentile: an SLO broken on any router counts.
        return max(merged[TTFT], default=None), max(merged[ITL], default=None)

    def _scrape(self, urls: Iterable[str]) -> list[str]:
        return [text for url in urls if (text := self._scrape_one(url)) is not None]

    def _scrape_one(self, url: str) -> str | None:
        try:
            return self.fetch(url)
        except (OSError, ValueError) as error:
            log.warning("cannot scrape %s: %s", url, error)
            return None
