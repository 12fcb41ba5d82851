"""The autoscaler's inputs: Prometheus text scraped from the router(s) and the workers.

Read with `prometheus_client.parser`. Latency percentiles come from the routers' histograms
as bucket deltas between two scrapes of each router, summed over the routers (what
`histogram_quantile(0.9, sum by (le) (rate(...[interval])))` computes), so each interval sees
only its own requests, from every router. Names (vLLM's, under `baton:`):

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


def bucket_deltas(before: Buckets, after: Buckets) -> Buckets | None:
    """The observations one histogram got between two scrapes, per bucket; None if any count
    went backwards (a restarted or different process behind the same address)."""
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    return None if any(v < 0 for v in delta.values()) else delta


def sum_buckets(deltas: Sequence[Buckets]) -> Buckets:
    """Several processes' bucket deltas as one distribution (the bounds all of them have)."""
    if not deltas:
        return {}
    bounds = set(deltas[0]).intersection(*deltas[1:])
    return {le: sum(d[le] for d in deltas) for le in bounds}


def quantile_of(q: float, delta: Buckets) -> float | None:
    """The `q` quantile (seconds) of a histogram's bucket deltas, interpolated linearly inside
    its bucket as Prometheus does; None if there were no observations."""
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


def quantile(q: float, before: Buckets, after: Buckets) -> float | None:
    """The `q` quantile of the observations made between two scrapes of one histogram; None if
    there were none, or if the counts went backwards."""
    delta = bucket_deltas(before, after)
    return None if delta is None else quantile_of(q, delta)


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
    """Scrapes the routers and the workers each interval; remembers each router's histograms.

    `router_urls` is a list of /metrics URLs, or a function giving them at each scrape (every
    ready router pod: they come and go); `worker_urls()` gives the workers' likewise. The
    percentiles are those of every router's observations together: each router's bucket
    deltas since its previous scrape, summed. A router seen for the first time (or not scraped
    last time) only sets its baseline; one whose counts went backwards (restarted) is left out
    of that interval; one that is gone is forgotten."""

    router_urls: Sequence[str] | Callable[[], Iterable[str]]
    worker_urls: Callable[[], Iterable[str]] = lambda: ()
    fetch: Callable[[str], str] = fetch_text
    quantile: float = 0.9
    _last: dict[str, dict[str, Buckets]] = field(default_factory=dict)  # url -> name -> buckets

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
        urls = self.router_urls() if callable(self.router_urls) else self.router_urls
        deltas: dict[str, list[Buckets]] = {TTFT: [], ITL: []}
        scraped: dict[str, dict[str, Buckets]] = {}
        for url in dict.fromkeys(urls):
            text = self._scrape_one(url)
            if text is None:
                continue
            scraped[url] = {name: histogram_buckets(text, name) for name in deltas}
            before = self._last.get(url)
            for name, found in deltas.items():
                delta = None if before is None else bucket_deltas(before[name], scraped[url][name])
                if delta:
                    found.append(delta)
        self._last = scraped  # routers not scraped now start over from their next scrape
        ttft = quantile_of(self.quantile, sum_buckets(deltas[TTFT]))
        return ttft, quantile_of(self.quantile, sum_buckets(deltas[ITL]))

    def _scrape(self, urls: Iterable[str]) -> list[str]:
        return [text for url in urls if (text := self._scrape_one(url)) is not None]

    def _scrape_one(self, url: str) -> str | None:
        try:
            return self.fetch(url)
        except (OSError, ValueError) as error:
            log.warning("cannot scrape %s: %s", url, error)
            return None
