"""The autoscaler reads every router: the collector over real prometheus_client /metrics
servers that come and go between scrapes (each router's bucket deltas, summed), and the router
pods found from the router Service's EndpointSlices on the stand-in API server."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram, start_http_server

from cluster import free_port
from cluster.autoscale.collector import ITL, TTFT, MetricsCollector
from cluster.autoscale.kubernetes import KubernetesActuator, RouterPods
from launcher.cli import main
from tests.kube_stand_in import KubeStandIn, KubeState

BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5)


class Router:
    """One router's /metrics on `host`:`port`: real histograms served by prometheus_client."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(TTFT, "ttft", ["model_name"], registry=self.registry,
                              buckets=BUCKETS)  # fmt: skip
        self.itl = Histogram(ITL, "itl", ["model_name"], registry=self.registry, buckets=BUCKETS)
        self.server, self.thread = start_http_server(port, host, self.registry)
        self.url = f"http://{host}:{port}/metrics"

    def observe(self, ttft_s: float, times: int, itl_s: float = 0.05) -> None:
        for _ in range(times):
            self.ttft.labels("m").observe(ttft_s)
            self.itl.labels("m").observe(itl_s)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def routers():
    """Three routers on 127.0.0.2-4, one port (as pods share a container port)."""
    port = free_port()
    started = [Router(f"127.0.0.{i}", port) for i in (2, 3, 4)]
    yield started
    for router in started:
        router.stop()


def test_the_percentile_is_every_routers_requests_together(routers) -> None:
    a, b, c = routers
    up = [a.url, b.url]
    collector = MetricsCollector(lambda: up)
    assert collector.collect().ttft_p90_s is None  # baselines only
    a.observe(0.05, 100)  # a fast router with most requests...
    b.observe(2.0, 5)  # ...and a slow one: the slowest 5% of all requests
    measured = collector.collect()
    assert measured.ttft_p90_s == pytest.approx(0.1 * 0.9 * 105 / 100)  # not max(p90s) ~ 2.4
    assert measured.itl_p90_s == pytest.approx(0.09)
    b.observe(2.0, 50)
    assert collector.collect().ttft_p90_s > 1.0  # now b's slow requests are over 10%


def test_routers_that_come_and_go_give_no_bogus_deltas(routers) -> None:
    a, b, c = routers
    for router in routers:
        router.observe(2.0, 1000)  # history from before the autoscaler looked
    up = [a.url, b.url]
    collector = MetricsCollector(lambda: up)
    collector.collect()
    a.observe(0.05, 10)
    up.append(c.url)  # c appears with 1000 slow requests in its counts: only its baseline
    assert collector.collect().ttft_p90_s == pytest.approx(0.09)
    up.remove(a.url)  # a leaves, then comes back: a fresh baseline, not a delta over the gap
    a.observe(2.0, 500)
    c.observe(0.05, 10)
    assert collector.collect().ttft_p90_s == pytest.approx(0.09)
    up.append(a.url)
    assert collector.collect().ttft_p90_s is None
    b.stop()  # b cannot be scraped: skipped, and the others still count
    a.observe(0.2, 10)
    assert 0.1 < collector.collect().ttft_p90_s <= 0.25


def test_a_restarted_router_is_left_out_of_that_interval(routers) -> None:
    a, b, _ = routers
    collector = MetricsCollector([a.url, b.url])
    b.observe(2.0, 100)
    collector.collect()
    b.registry.unregister(b.ttft)  # b restarts: its counts start over from 0
    b.ttft = Histogram(TTFT, "ttft", ["model_name"], registry=b.registry, buckets=BUCKETS)
    b.observe(2.0, 5)
    a.observe(0.05, 10)
    assert collector.collect().ttft_p90_s == pytest.approx(0.09)


def test_router_pods_come_from_the_router_services_slices(routers, tmp_path) -> None:
    a, b, c = routers
    port = int(a.url.split(":")[2].split("/")[0])
    state = KubeState(
        replicas={"p": 1, "d": 1}, pods={"p": ["Running"], "d": ["Running"]}, http_port=port,
        endpoints={"r": [("127.0.0.2", True, False), ("127.0.0.3", True, False),
                         ("127.0.0.4", False, False)]},
    )  # fmt: skip
    with KubeStandIn(state) as kube:
        kubeconfig = str(kube.kubeconfig(tmp_path / "kubeconfig"))
        actuator = KubernetesActuator.connect("baton", {"prefill": "p", "decode": "d"}, kubeconfig)
        pods = RouterPods(actuator.api_client, "baton", "r")
        assert pods.metrics_urls() == [a.url, b.url]  # the slices' http port; c is not ready
        assert RouterPods(actuator.api_client, "baton", "r", 9).metrics_urls() == [
            "http://127.0.0.2:9/metrics", "http://127.0.0.3:9/metrics"]  # fmt: skip
        collector = MetricsCollector(pods.metrics_urls)
        collector.collect()
        a.observe(0.05, 10)
        b.observe(0.05, 10)
        state.endpoints["r"] = [("127.0.0.2", True, True), ("127.0.0.3", True, False),
                                ("127.0.0.4", True, False)]  # fmt: skip
        assert collector.collect().ttft_p90_s == pytest.approx(0.09)  # b only: a terminates
        assert pods.metrics_urls() == [b.url, c.url]
    assert pods.metrics_urls() == [b.url, c.url]  # the API server is gone: the last view


def test_baton_autoscale_scrapes_the_router_service(routers, tmp_path, capsys) -> None:
    a = routers[0]
    state = KubeState(replicas={"p": 1, "d": 1}, pods={"p": ["Running"], "d": ["Running"]},
                      endpoints={"r": [("127.0.0.2", True, False)]})  # fmt: skip
    with KubeStandIn(state) as kube:
        flags = ["autoscale", "--kubernetes", "--namespace", "baton", "--kubeconfig",
                 str(kube.kubeconfig(tmp_path / "kubeconfig")), "--prefill-deployment", "p",
                 "--decode-deployment", "d", "--interval", "1", "--steps", "2",
                 "--ttft-slo", "0.5", "--scale-up-intervals", "1",
                 "--scale-up-cooldown", "0"]  # fmt: skip
        port = a.url.split(":")[2].split("/")[0]
        a.observe(0.05, 10)
        slow = threading.Timer(0.3, a.observe, (2.0, 10))  # between the two steps
        slow.start()
        assert main([*flags, "--router-service", "r", "--router-port", port]) == 0
        slow.join()
        assert state.patches == [("p", {"spec": {"replicas": 2}})]
        assert "prefill 1 -> 2 (TTFT p90 2.350 s" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            main([*flags, "--router-url", kube.url, "--router-service", "r"])
        assert "not allowed with argument --router-url" in capsys.readouterr().err
        assert main([*flags, "--router-url", kube.url, "--router-port", port]) == 2
        assert "--router-port needs --router-service" in capsys.readouterr().err
