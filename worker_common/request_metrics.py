"""A worker's per-request and per-step histograms, named as vLLM's with a `baton:` prefix.

Per request, once it leaves this engine (finished, aborted, or handed off to a decode worker),
from the timestamps the scheduler keeps (`engine.request.RequestTimes`), as vLLM derives them:

    arrival ── queue ── first scheduled ── prefill ── first token ── decode ── last token
       └──────────── time to first token ─────────────┘
       └──────────────────────────── e2e (to finished) ─────────────────────────────┘

On a decode worker "arrival" is the reservation, "first scheduled" the KV's arrival and "first
token" the first one it samples (the prefill worker sampled the one before). Per step: the
tokens it computed (`iteration_tokens_total`) and the time between two steps that each gave a
request a token (`inter_token_latency_seconds`, one weighted observation per step rather than
one call per token).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from common.metric_buckets import (
    ITERATION_TOKENS_BUCKETS,
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
)
from engine.request import Request

FINISH_REASONS = ("stop", "length", "abort")


class WeightedHistogram(Collector):
    """A histogram whose `observe(value, count)` adds `count` samples of `value` in one call
    (prometheus_client's Histogram takes one sample per call)."""

    def __init__(
        self, name: str, doc: str, labels: dict[str, str], buckets: Sequence[float]
    ) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.bounds = list(buckets)
        self._counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, count: int = 1) -> None:
        if count <= 0:
            return
        i = bisect.bisect_left(self.bounds, value)  # le: a value on a bound counts in it
        with self._lock:
            self._counts[i] += count
            self._sum += value * count

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        cumulative, buckets = 0, []
        for bound, count in zip([*map(floatToGoString, self.bounds), "+Inf"], counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(list(self.labels.values()), buckets, total)
        yield family


class RequestMetrics:
    """vLLM's request-level metrics of one worker; `finished` is the scheduler's listener."""

    def __init__(self, labels: dict[str, str], registry: CollectorRegistry) -> None:
        names = list(labels)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(
                f"baton:{name}", doc, names, buckets=buckets, registry=registry
            ).labels(**labels)

        latency = REQUEST_LATENCY_BUCKETS
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival here to the first token sampled here.",
            TTFT_BUCKETS,
        )  # fmt: skip
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival here to leaving.", latency)
        self.queue = histogram("request_queue_time_seconds", "Arrival to first scheduled.", latency)
        self.prefill = histogram(
            "request_prefill_time_seconds", "First scheduled to first token.", latency
        )
        self.decode = histogram(
            "request_decode_time_seconds", "First token to last token, here.", latency
        )
        self.inference = histogram(
            "request_inference_time_seconds", "First scheduled to last token.", latency
        )
        self.prompt_tokens = Counter(
            "baton:prompt_tokens", "Prompt tokens of requests that got a token here.", names,
            registry=registry,
        ).labels(**labels)  # fmt: skip
        success = Counter(
            "baton:request_success", "Requests finished here, by reason.",
            [*names, "finished_reason"], registry=registry,
        )  # fmt: skip
        self.success = {r: success.labels(**labels, finished_reason=r) for r in FINISH_REASONS}
        self.itl = WeightedHistogram(
            "baton:inter_token_latency_seconds",
            "Time between a request's tokens from consecutive steps.", labels, ITL_BUCKETS,
        )  # fmt: skip
        self.iteration_tokens = WeightedHistogram(
            "baton:iteration_tokens_total", "Tokens computed by one engine step.", labels,
            ITERATION_TOKENS_BUCKETS,
        )  # fmt: skip
        registry.register(self.itl)
        registry.register(self.iteration_tokens)

    def finished(self, request: Request) -> None:
        """`request` leaves this engine (called on the engine thread, once per request)."""
        times = request.times
        end = times.finished or times.last_token
        if times.first_scheduled is not None:
            self.queue.observe(times.first_scheduled - times.arrival)
        if times.first_token is not None:
            self.ttft.observe(times.first_token - times.arrival)
            self.prompt_tokens.inc(request.num_prompt_tokens)
            if times.first_scheduled is not None:
                self.prefill.observe(times.first_token - times.first_scheduled)
            last = times.last_token or times.first_token
            self.decode.observe(last - times.first_token)
            if times.first_scheduled is not None:
                self.inference.observe(last - times.first_scheduled)
        if end is not None:
            self.e2e.observe(end - times.arrival)
        reason = request.status.finish_reason  # None when handed off
        if reason is not None:
            self.success[reason].inc()
