"""The Kubernetes side of autoscaling against a stand-in API server over HTTP (the real
`kubernetes` client, through a generated kubeconfig): the actuator, the loop with metrics made
by prometheus_client, `baton autoscale`, and the router's EndpointSlice discovery."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from cluster.autoscale.collector import (
    TTFT,
    MetricsCollector,
    histogram_buckets,
    quantile,
)
from cluster.autoscale.kubernetes import KubernetesActuator
from cluster.autoscale.loop import Autoscaler
from cluster.autoscale.policy import AutoscaleConfig, DecodePolicy, PrefillPolicy
from launcher.cli import main
from tests.kube_stand_in import KubeStandIn, KubeState

FAST = AutoscaleConfig(
    prefill=PrefillPolicy(min_replicas=1, max_replicas=4, up_intervals=2, down_intervals=3,
                          up_cooldown_s=0, down_cooldown_s=0, ttft_slo_s=0.5),
    decode=DecodePolicy(min_replicas=1, max_replicas=4, up_intervals=2, down_intervals=50,
                        up_cooldown_s=0, down_cooldown_s=0, itl_slo_s=0.05),
    manual_cooldown_s=1000,
)  # fmt: skip


class RouterMetricsText:
    """A router's /metrics made by prometheus_client, with TTFTs observed on demand."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(TTFT, "ttft", ["model_name"], registry=self.registry,
                              buckets=(0.1, 0.25, 0.5, 1.0, 2.5))  # fmt: skip
        self.running = Gauge("baton:num_requests_running", "r", ["model_name", "role"],
                             registry=self.registry)  # fmt: skip

    def observe(self, seconds: float, times: int = 20) -> str:
        for _ in range(times):
            self.ttft.labels("m").observe(seconds)
        return generate_latest(self.registry).decode()


@pytest.fixture()
def kube(tmp_path):
    state = KubeState(replicas={"p": 1, "d": 2}, pods={"p": ["Running"], "d": ["Running"] * 2})
    with KubeStandIn(state) as server:
        server.kubeconfig(tmp_path / "kubeconfig")
        yield server


def _actuator(kube, tmp_path, metrics_port=None) -> KubernetesActuator:
    return KubernetesActuator.connect(
        "baton", {"prefill": "p", "decode": "d"}, str(tmp_path / "kubeconfig"), metrics_port
    )


def test_quantile_from_bucket_deltas() -> None:
    text = RouterMetricsText()
    before = histogram_buckets(text.observe(0.05, 100), TTFT)  # an old, fast interval
    after = histogram_buckets(text.observe(2.0, 10), TTFT)  # this interval: all slow
    assert 1.0 < quantile(0.9, before, after) <= 2.5
    assert quantile(0.9, after, after) is None  # nothing observed
    assert quantile(0.9, after, before) is None  # counts went back: another process


def test_the_actuator_reads_and_scales_deployments(kube, tmp_path) -> None:
    kube.state.pods["d"] = ["Running", "Pending"]
    actuator = _actuator(kube, tmp_path, metrics_port=9100)
    assert actuator.replicas("prefill").actual == 1
    decode = actuator.replicas("decode")
    assert (decode.actual, decode.pending) == (2, 1)
    assert actuator.worker_metrics_urls() == [
        "http://10.0.0.1:9100/metrics", "http://10.0.0.1:9100/metrics"
    ]
    actuator.scale("decode", 3)
    assert kube.state.patches == [("d", {"spec": {"replicas": 3}})]
    assert actuator.replicas("decode").actual == 3


def test_the_loop_scales_up_on_a_breach_not_while_pending_and_respects_edits(
    kube, tmp_path
) -> None:
    router = RouterMetricsText()
    kube.state.metrics_text = router.observe(0.05)
    collector = MetricsCollector([f"{kube.url}/metrics"])
    autoscaler = Autoscaler(_actuator(kube, tmp_path), collector, FAST, interval_s=0.01)
    autoscaler.step()  # the first scrape: no interval yet
    for _ in range(FAST.prefill.up_intervals):  # TTFT p90 2 s against an SLO of 0.5 s
        kube.state.metrics_text = router.observe(2.0)
        autoscaler.step()
    assert kube.state.patches == [("p", {"spec": {"replicas": 2}})]
    kube.state.pods["p"].append("Pending")  # the new pod waits for a node
    for _ in range(4):
        kube.state.metrics_text = router.observe(2.0)
        decision = autoscaler.step()
    assert len(kube.state.patches) == 1 and "pending" in decision.prefill.reason
    kube.state.replicas["d"] = 4  # someone runs `kubectl scale --replicas 4` on decode
    decision = autoscaler.step()
    assert decision.decode.desired == 4 and "manual" in decision.decode.reason
    quick = replace(FAST.decode, down_intervals=1)
    autoscaler.config = replace(FAST, decode=quick)  # decode would step down at once ...
    for _ in range(5):
        decision = autoscaler.step()
    assert "manual edit" in decision.decode.reason  # ... but the edit's cooldown holds
    assert all(name == "p" for name, _ in kube.state.patches)


def test_baton_autoscale_runs_against_the_api_server(kube, tmp_path, capsys) -> None:
    import httpx

    from cluster import free_port

    kube.state.metrics_text = RouterMetricsText().observe(0.05)
    metrics_port = free_port()
    status = main([
        "autoscale", "--kubernetes", "--namespace", "baton", "--kubeconfig",
        str(tmp_path / "kubeconfig"), "--prefill-deployment", "p", "--decode-deployment", "d",
        "--router-url", kube.url, "--interval", "0.01", "--steps", "2",
        "--decode-min", "3", "--decode-max", "5", "--metrics-port", str(metrics_port),
    ])  # fmt: skip
    assert status == 0
    exported = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert 'baton:autoscaler_desired_replicas{role="decode"} 3.0' in exported
    assert kube.state.patches == [("d", {"spec": {"replicas": 3}})]  # below its new minimum
    assert "decode 2 -> 3 (below min 3)" in capsys.readouterr().out


def test_baton_autoscale_refuses_bad_bounds(kube, tmp_path, capsys) -> None:
    status = main([
        "autoscale", "--kubernetes", "--kubeconfig", str(tmp_path / "kubeconfig"),
        "--prefill-deployment", "p", "--decode-deployment", "d", "--router-url", kube.url,
        "--decode-min", "5", "--decode-max", "2",
    ])  # fmt: skip
    assert status == 2 and "min_replicas" in capsys.readouterr().err


def test_router_discovery_follows_endpoint_slices(kube, tmp_path) -> None:
    from router.config import RouterConfig
    from router.discovery import EndpointSliceDiscovery
    from router.membership import Membership
    from router.registry import WorkerRegistry
    from router.workers import Role

    kube.state.endpoints = {"decode-svc": [("10.1.0.1", True, False), ("10.1.0.2", False, False)]}
    config = RouterConfig("m", kubernetes_namespace="baton", decode_service="decode-svc",
                          kubeconfig=str(tmp_path / "kubeconfig"))  # fmt: skip

    async def run() -> None:
        registry = WorkerRegistry({}, "m", poll_interval_s=0.05, poll_timeout_s=0.05)
        membership = Membership(registry, None, drain_timeout_s=1.0)
        discovery = EndpointSliceDiscovery.from_config(config, membership)
        await discovery.sync_once()
        assert [w.address for w in registry.configured(Role.DECODE)] == ["10.1.0.1:50051"]
        kube.state.endpoints["decode-svc"] = [("10.1.0.1", True, True), ("10.1.0.2", True, False)]
        await discovery.sync_once()  # .1 terminates: it drains; .2 is ready now
        assert registry.find("10.1.0.1:50051").draining
        assert [w.address for w in registry.healthy(Role.DECODE)] == []  # none answers polls
        deadline = time.monotonic() + 5
        while registry.find("10.1.0.1:50051") and time.monotonic() < deadline:
            await registry.poll_once()
            await asyncio.sleep(0.05)
        assert [w.address for w in registry.workers] == ["10.1.0.2:50051"]
        await membership.close()
        await registry.close()

    asyncio.run(run())
