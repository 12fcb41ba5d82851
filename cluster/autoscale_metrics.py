"""The autoscaler's Prometheus metrics (torch-free): the replicas it wants and those that run,
per worker role, as `baton:autoscaler_desired_replicas{role}` and
`baton:autoscaler_actual_replicas{role}` (the dashboard plots one against the other), and
the scaling steps it took.

    metrics = AutoscalerMetrics()
    metrics.serve(9400)                       # /metrics on that port (optional)
    metrics.record("decode", desired=3, actual=2)
    metrics.scaled("decode", "up")
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

ROLES = ("prefill", "decode")
DIRECTIONS = ("up", "down")


class AutoscalerMetrics:
    """One autoscaler's gauges and counters, in their own registry (several may live in one
    process, as in tests). Every role's series exist from the start, at 0."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.desired = Gauge(
            "baton:autoscaler_desired_replicas",
            "Replicas the autoscaler's policy wants for the role (after bounds and cooldowns)",
            ["role"], registry=r,
        )  # fmt: skip
        self.actual = Gauge(
            "baton:autoscaler_actual_replicas",
            "Replicas of the role that run (ready), as the actuator reports them",
            ["role"], registry=r,
        )  # fmt: skip
        self.steps = Counter(
            "baton:autoscaler_scaling_steps",
            "Scaling steps the autoscaler applied, by role and direction",
            ["role", "direction"], registry=r,
        )  # fmt: skip
        for role in ROLES:
            self.desired.labels(role)
            self.actual.labels(role)
            for direction in DIRECTIONS:
                self.steps.labels(role, direction)

    def record(self, role: str, desired: int, actual: int) -> None:
        """The latest decision for `role`: `desired` replicas wanted, `actual` running."""
        self.desired.labels(role).set(desired)
        self.actual.labels(role).set(actual)

    def scaled(self, role: str, direction: str) -> None:
        """One step of `role` applied, `direction` "up" or "down"."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
        self.steps.labels(role, direction).inc()

    def render(self) -> bytes:
        """The text exposition of these metrics."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> WSGIServer:
        """Serve /metrics on `host:port` from a background thread; `shutdown()` the server
        returned to stop."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
