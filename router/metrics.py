"""Prometheus metrics, named like vLLM's with a `baton:` prefix so its dashboards translate
(docs/metrics.md lists them all).

All times are seconds, measured at the router from a request's arrival: what clients see.
The router's series carry no `role` label (the workers' do), except `routing_*` and
`worker_healthy`, whose `role` is the worker's. Each `RouterMetrics` owns its own
`CollectorRegistry` (several routers can live in one test process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common.metric_buckets import ITL_BUCKETS, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS
from router.policies import RequestContext
from router.workers import WorkerInfo

# Leading prompt blocks the chosen worker already held, per the prefix index.
CACHED_BLOCKS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class RouterMetrics:
    """The router's metrics for one served model (label `model_name`)."""

    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        model = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"baton:{name}", doc, model, buckets=buckets, registry=r)

        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token", TTFT_BUCKETS)
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between a completion's chunks", ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to last token", REQUEST_LATENCY_BUCKETS
        )
        self.local_prefills = Counter(
            "baton:local_prefills",
            "Requests a decode worker prefilled itself (conditional disaggregation)",
            model,
            registry=r,
        )
        self.local_prefills.labels(model_name)  # exported at 0 from the start
        self.running = Gauge(
            "baton:num_requests_running", "In-flight requests that have a token", model, registry=r
        )
        self.waiting = Gauge(
            "baton:num_requests_waiting",
            "In-flight requests without a token yet",
            model,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "baton:prompt_tokens", "Prompt tokens received", model, registry=r
        )
        self.generation_tokens = Counter(
            "baton:generation_tokens", "Tokens generated", model, registry=r
        )
        self.success = Counter(
            "baton:request_success", "Completions finished, by reason",
            ["model_name", "finished_reason"], registry=r,
        )  # fmt: skip
        self.failures = Counter(
            "baton:request_failure", "Requests failed, by HTTP status",
            ["model_name", "status"], registry=r,
        )  # fmt: skip
        self.routing_decisions = Counter(
            "baton:routing_decisions", "Requests routed to a worker, by policy and worker role",
            ["model_name", "policy", "role"], registry=r,
        )  # fmt: skip
        self.routing_cached_blocks = Histogram(
            "baton:routing_cached_blocks",
            "Leading prompt blocks the chosen worker held (prefix index), per routing decision",
            ["model_name", "policy", "role"], buckets=CACHED_BLOCKS_BUCKETS, registry=r,
        )  # fmt: skip
        self.worker_healthy = Gauge(
            "baton:worker_healthy", "1 if the worker answered its last poll",
            ["role", "address"], registry=r,
        )  # fmt: skip
        self._health_series: set[tuple[str, str]] = set()  # worker_healthy's label sets

    def render(self, workers: list[WorkerInfo]) -> bytes:
        """The text exposition of every metric, worker health refreshed first: the series of
        a worker no longer in `workers` (removed from the registry) goes."""
        healthy = {(w.role.value, w.address): w.healthy for w in workers}
        for labels in self._health_series - healthy.keys():
            self.worker_healthy.remove(*labels)
        for labels, up in healthy.items():
            self.worker_healthy.labels(*labels).set(1 if up else 0)
        self._health_series = set(healthy)
        return generate_latest(self.registry)

    def routed(self, policy: str, worker: WorkerInfo, ctx: RequestContext) -> None:
        """`policy` sent the request in `ctx` to `worker` (`RoutingPolicy.on_decision`)."""
        labels = (self.model_name, policy, worker.role.value)
        self.routing_decisions.labels(*labels).inc()
        cached = ctx.prefix_matches.get(worker.address, 0)
        self.routing_cached_blocks.labels(*labels).observe(cached)

    def request_arrived(self, num_prompt_tokens: int) -> None:
        """A request starts generating: it waits for its first token."""
        self.waiting.labels(self.model_name).inc()
        self.prompt_tokens.labels(self.model_name).inc(num_prompt_tokens)

    def first_token(self, ttft_s: float) -> None:
        """A request's first token came `ttft_s` seconds after its arrival."""
        self.ttft.labels(self.model_name).observe(ttft_s)
        self.waiting.labels(self.model_name).dec()
        self.running.labels(self.model_name).inc()

    def tokens(self, num_tokens: int, since_previous_s: float | None) -> None:
        """`num_tokens` new tokens of one completion; `since_previous_s` since its last ones."""
        self.generation_tokens.labels(self.model_name).inc(num_tokens)
        if since_previous_s is not None:
            self.itl.labels(self.model_name).observe(since_previous_s)

    def completion_finished(self, finish_reason: str) -> None:
        """One completion ended ("stop", "length", "abort")."""
        self.success.labels(self.model_name, finish_reason).inc()

    def request_ended(self, started: bool, e2e_s: float | None) -> None:
        """A request left the router; `started`: it had produced a token."""
        (self.running if started else self.waiting).labels(self.model_name).dec()
        if e2e_s is not None:
            self.e2e.labels(self.model_name).observe(e2e_s)

    def request_failed(self, http_status: int) -> None:
        """A request was refused or failed with `http_status` (gRPC: its HTTP equivalent)."""
        self.failures.labels(self.model_name, str(http_status)).inc()
