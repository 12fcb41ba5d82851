"""The autoscaler's loop: every interval, measure, decide, and apply one step per role."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.autoscale.actuator import Actuator
from cluster.autoscale.collector import MetricsCollector
from cluster.autoscale.policy import AutoscaleConfig, AutoscaleState, Decision, Snapshot, decide
from cluster.autoscale_metrics import AutoscalerMetrics

log = logging.getLogger(__name__)


@dataclass
class Autoscaler:
    """Runs `decide` over the collector's measurements and the actuator's replica counts.

    `metrics` (optional) exports each decision's desired and actual replicas and the steps
    taken; `on_decision` sees every decision."""

    actuator: Actuator
    collector: MetricsCollector
    config: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    interval_s: float = 15.0
    clock: Callable[[], float] = time.monotonic
    on_decision: Callable[[Decision], None] | None = None
    metrics: AutoscalerMetrics | None = None
    state: AutoscaleState = field(default_factory=AutoscaleState)
    decisions: list[Decision] = field(default_factory=list)  # the latest few, newest last

    def step(self) -> Decision:
        """One interval: snapshot, decide, apply."""
        measured = self.collector.collect()
        prefill, decode = self.actuator.replicas("prefill"), self.actuator.replicas("decode")
        snapshot = Snapshot(
            time_s=self.clock(),
            prefill_replicas=prefill.actual,
            decode_replicas=decode.actual,
            prefill_pending=prefill.pending,
            decode_pending=decode.pending,
            prompt_tokens_waiting=measured.prompt_tokens_waiting,
            ttft_p90_s=measured.ttft_p90_s,
            kv_usage=measured.kv_usage,
            requests_running=measured.requests_running,
            itl_p90_s=measured.itl_p90_s,
        )
        decision = decide(snapshot, self.state, self.config)
        self.state = decision.state
        for role, choice in (("prefill", decision.prefill), ("decode", decision.decode)):
            if self.metrics is not None:
                self.metrics.record(role, choice.desired, choice.current)
                if choice.step:
                    self.metrics.scaled(role, "up" if choice.step > 0 else "down")
            if choice.step:
                log.info("autoscale %s %d -> %d: %s", role, choice.current, choice.desired,
                         choice.reason)  # fmt: skip
                self.actuator.scale(role, choice.desired)
        self.decisions = [*self.decisions[-99:], decision]
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision

    def run(self, stop: threading.Event) -> None:
        """Step every `interval_s` until `stop` is set; a failed step is logged, not fatal."""
        while not stop.wait(self.interval_s):
            try:
                self.step()
            except Exception:
                log.exception("autoscaler step failed")

    def start(self) -> tuple[threading.Thread, threading.Event]:
        """`run` in a daemon thread; set the returned event to stop it."""
        stop = threading.Event()
        thread = threading.Thread(target=self.run, args=(stop,), name="autoscaler", daemon=True)
        thread.start()
        return thread, stop
