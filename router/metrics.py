"""Prometheus metrics, named like vLLM's with a `baton:` prefix so its dashboards translate.

All times are seconds, measured at the router from a request's arrival. Each `RouterMetrics`
owns its own `CollectorRegistry` (several routers can live in one test process).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.workers import WorkerInfo

# vLLM's buckets, in seconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


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
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token", E2E_BUCKETS)
        self.local_prefills = Counter(
            "baton:local_prefills",
            "Requests a decode worker prefilled itself (conditional disaggregation)",
            model,
            registry=r,
        )
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
        self.worker_healthy = Gauge(
            "baton:worker_healthy", "1 if the worker answered its last poll",
            ["role", "address"], registry=r,
        )  # fmt: skip

    def render(self, workers: list[WorkerInfo]) -> bytes:
        """The text exposition of every metric, worker health refreshed first."""
        for w in workers:
            self.worker_healthy.labels(w.role.value, w.address).set(1 if w.healthy else 0)
        return generate_latest(self.registry)

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
