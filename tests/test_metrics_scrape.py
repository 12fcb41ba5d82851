"""Every service's /metrics after traffic: a real cluster (router, prefill and decode workers on a
tiny model) serves a few requests, then each endpoint is scraped and parsed. vLLM's names exist
where they belong and count the traffic; every metric the Grafana dashboard queries exists on
some service. Unit checks: the scheduler's queued prompt tokens, the worker's per-request
histograms from a request's timestamps, the weighted histogram, the autoscaler's gauges."""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cluster import ClusterSpec, free_port, start_cluster
from cluster.autoscale_metrics import AutoscalerMetrics
from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.scheduler import Scheduler
from tests.workers import ROOT
from worker_common.request_metrics import RequestMetrics, WeightedHistogram

DASHBOARD = ROOT / "helm" / "baton" / "files" / "dashboards" / "baton.json"
# A Prometheus metric name under Baton's prefix (digits too: `e2e_...`).
METRIC_NAME = re.compile(r"baton:[a-zA-Z_:][a-zA-Z0-9_:]*")

FLAGS = ["--num-kv-blocks", "128", "--max-num-batched-tokens", "64"]
Samples = dict[str, float]  # sample name (with its _total/_bucket/... suffix) -> sum over labels

# What the traffic below must have counted, per service (sample names, summed over labels).
COUNTED = {
    "router": [
        "baton:time_to_first_token_seconds_count", "baton:inter_token_latency_seconds_count",
        "baton:e2e_request_latency_seconds_count", "baton:prompt_tokens_total",
        "baton:generation_tokens_total", "baton:request_success_total",
        "baton:routing_decisions_total", "baton:routing_cached_blocks_count",
    ],
    "prefill": [
        "baton:time_to_first_token_seconds_count", "baton:request_queue_time_seconds_count",
        "baton:request_prefill_time_seconds_count", "baton:e2e_request_latency_seconds_count",
        "baton:prompt_tokens_total", "baton:prefix_cache_queries_total",
        "baton:iteration_tokens_total_count",
        "baton:kv_transfer_bytes_total", "baton:kv_transfer_seconds_count",
    ],
    "decode": [
        "baton:generation_tokens_total", "baton:inter_token_latency_seconds_count",
        "baton:request_decode_time_seconds_count", "baton:request_success_total",
        "baton:request_queue_time_seconds_count", "baton:iteration_tokens_total_count",
        "baton:prefix_cache_hits_total",
    ],
}  # fmt: skip
# vLLM's names that every worker exports (even at zero).
WORKER_NAMES = [
    "baton:num_requests_running", "baton:num_requests_waiting", "baton:kv_cache_usage_perc",
    "baton:num_prompt_tokens_waiting", "baton:num_preemptions_total",
    "baton:request_inference_time_seconds_bucket",
]  # fmt: skip


def parse(text: str) -> Samples:
    """Each sample name of a Prometheus text exposition, with its values summed."""
    samples: Samples = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name] += sample.value
    return dict(samples)


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, url
    return parse(response.text)


@pytest.fixture(scope="module")
def served(tiny_model) -> Iterator[dict[str, str]]:
    """A running cluster after traffic, and an autoscaler's metrics endpoint (the autoscaler
    itself is not started here): service name -> its /metrics URL."""
    model = tiny_model("qwen2")
    spec = ClusterSpec(model, prefill=1, decode=1, port=free_port(), grpc_port=free_port(),
                       worker_args=FLAGS)  # fmt: skip
    autoscaler, autoscaler_port = AutoscalerMetrics(), free_port()
    server = autoscaler.serve(autoscaler_port)
    cluster = start_cluster(spec)
    try:
        base = f"http://127.0.0.1:{spec.port}"
        _traffic(base, model.name)
        urls = {"router": f"{base}/metrics"}
        urls.update({w.role: w.metrics_url for w in cluster.workers})
        urls["autoscaler"] = f"http://127.0.0.1:{autoscaler_port}/metrics"
        yield urls
    finally:
        cluster.stop()
        server.shutdown()


def _traffic(base: str, model: str) -> None:
    """A shared 64-token prefix (4 blocks: prefix-cache hits), plain and streamed."""
    shared = list(range(10, 74))
    for i in range(3):
        body = {"model": model, "prompt": [*shared, 100 + i], "max_tokens": 6,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
    body = {"model": model, "prompt": "Hello there", "max_tokens": 8, "ignore_eos": True,
            "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert "[DONE]" in "".join(response.iter_text())
    refused = httpx.post(f"{base}/v1/completions", json={**body, "max_tokens": -1}, timeout=60)
    assert refused.status_code == 400  # counted in request_failure


def _counted(urls: dict[str, str]) -> dict[str, list[str]]:
    """Per service, the COUNTED samples still at zero (or missing)."""
    zero = {}
    for service, names in COUNTED.items():
        samples = scrape(urls[service])
        zero[service] = [n for n in names if samples.get(n, 0.0) <= 0]
    return zero


def test_every_service_counts_the_traffic(served) -> None:
    deadline = time.time() + 15  # KV-push figures land just after the push's reply
    while any((zero := _counted(served)).values()) and time.time() < deadline:
        time.sleep(0.2)
    assert zero == {service: [] for service in COUNTED}


def test_workers_export_vllms_gauges_and_counters(served) -> None:
    for role in ("prefill", "decode"):
        samples = scrape(served[role])
        assert [n for n in WORKER_NAMES if n not in samples] == [], role
        assert samples["baton:num_requests_running"] == 0  # the traffic is over


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries (and variables) reference, as written: sample
    names, suffix included (`_total`, `_bucket`, `_sum`, `_count`)."""
    return set(METRIC_NAME.findall(DASHBOARD.read_text(encoding="utf-8")))


def test_every_metric_the_dashboard_queries_exists(served) -> None:
    """Compared as sample names, so `x_bucket` must be a histogram's bucket series and
    `x_total` a counter's: a suffix that strips to some other metric's name does not pass."""
    exposed: set[str] = set()
    for url in served.values():
        exposed |= set(scrape(url))
    wanted = dashboard_metrics()
    assert len(wanted) > 25  # the scan found the queries
    assert sorted(wanted - exposed) == []


def test_the_dashboard_is_a_grafana_model_over_a_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
            assert METRIC_NAME.search(expr), expr
    titles = " ".join(p["title"] for p in panels).lower()
    topics = ("first token", "inter-token", "end-to-end", "kv cache", "prefix cache",
              "preemptions", "kv transfer", "routing", "autoscaler", "speculative")  # fmt: skip
    assert [t for t in topics if t not in titles] == []


# --- unit checks ------------------------------------------------------------------------------


def _request(rid: str, prompt_len: int) -> Request:
    params = SamplingParams(max_tokens=4)
    return Request(rid, list(range(1, prompt_len + 1)), params, 4, eos_token_ids=(0,))


def test_prompt_tokens_waiting_counts_what_is_left_to_prefill() -> None:
    kv = KVCacheManager(64, 4, enable_caching=False)
    sched = Scheduler(SchedulerConfig(10, 8), kv, 1000)
    sched.add_request(_request("long", 25))
    sched.add_request(_request("short", 3))
    assert sched.num_prompt_tokens_waiting() == 28
    out = sched.schedule()  # 10 tokens of "long"
    sched.update_from_output(out, {})
    assert sched.num_prompt_tokens_waiting() == 15 + 3
    for _ in range(2):  # the rest of "long", then "short" with it: both sample
        out = sched.schedule()
        sched.update_from_output(out, {s.request.request_id: 7 for s in out.scheduled if s.samples})
    assert sched.num_prompt_tokens_waiting() == 0
    assert sched.num_batched_tokens == 8


def test_request_metrics_follow_a_requests_timestamps() -> None:
    registry = CollectorRegistry()
    metrics = RequestMetrics({"role": "colocated", "model_name": "m"}, registry)
    request = _request("r", 5)
    times = request.times
    times.arrival, times.first_scheduled, times.first_token = 100.0, 100.5, 101.5
    times.last_token = times.finished = 104.0
    request.status = RequestStatus.FINISHED_LENGTH
    metrics.finished(request)
    handed_off = _request("h", 7)
    handed_off.times.first_token = handed_off.times.first_scheduled = handed_off.times.arrival
    handed_off.times.finished = handed_off.times.arrival + 0.1
    handed_off.status = RequestStatus.HANDED_OFF
    metrics.finished(handed_off)
    s = {(x.name, x.labels.get("le", x.labels.get("finished_reason"))): x.value
         for f in registry.collect() for x in f.samples}  # fmt: skip
    assert s["baton:request_queue_time_seconds_sum", None] == 0.5
    assert s["baton:request_prefill_time_seconds_sum", None] == 1.0
    assert s["baton:request_decode_time_seconds_sum", None] == 2.5
    assert s["baton:request_inference_time_seconds_sum", None] == 3.5
    assert s["baton:time_to_first_token_seconds_sum", None] == 1.5
    assert s["baton:e2e_request_latency_seconds_count", None] == 2
    assert s["baton:prompt_tokens_total", None] == 12
    assert s["baton:request_success_total", "length"] == 1  # the hand-off is no success here
    assert s["baton:request_success_total", "stop"] == 0


def test_weighted_histogram_counts_each_sample_in_its_bucket() -> None:
    histogram = WeightedHistogram("baton:x", "doc", {"role": "decode"}, (0.1, 1.0))
    histogram.observe(0.1, 3)  # on a bound: counts in it (le)
    histogram.observe(0.5, 2)
    histogram.observe(7.0)
    histogram.observe(9.0, 0)  # nothing
    samples = {(s.name, s.labels.get("le")): s.value
               for f in histogram.collect() for s in f.samples}  # fmt: skip
    assert samples["baton:x_bucket", "0.1"] == 3
    assert samples["baton:x_bucket", "1.0"] == 5
    assert samples["baton:x_bucket", "+Inf"] == 6
    assert samples["baton:x_count", None] == 6
    assert samples["baton:x_sum", None] == pytest.approx(0.3 + 1.0 + 7.0)


def test_autoscaler_metrics_are_served_per_role() -> None:
    metrics = AutoscalerMetrics()
    port = free_port()
    server = metrics.serve(port)
    try:
        metrics.record("decode", desired=3, actual=2)
        metrics.scaled("decode", "up")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
    assert 'baton:autoscaler_desired_replicas{role="decode"} 3.0' in text
    assert 'baton:autoscaler_actual_replicas{role="decode"} 2.0' in text
    assert 'baton:autoscaler_actual_replicas{role="prefill"} 0.0' in text
    assert 'baton:autoscaler_scaling_steps_total{direction="up",role="decode"} 1.0' in text
    with pytest.raises(ValueError, match="direction"):
        metrics.scaled("decode", "sideways")
