"""Structured outputs through a real worker process and the router, with the worker's
structured-outputs flags: a grammar that compiles slower than `--structured-outputs-compile-timeout`
is a 400 (gRPC INVALID_ARGUMENT) naming the field, the worker serves on and holds no block; the
worker's Prometheus metrics count compiles (by backend), cache queries and hits, failures,
timeouts and structured requests by the backend that served them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import grpc
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import free_port
from proto.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.testing import RouterThread
from tests.workers import WorkerProcess, assert_all_free

NUM_BLOCKS = 64
TIMEOUT_S = 2
# xgrammar takes seconds to compile a regex of this many alternatives over the tiny model's
# vocabulary (about 1 s for 10,000 alternatives, superlinear in them): well past TIMEOUT_S.
SLOW_ALTERNATIVES = 25_000


def _slow_regex(tag: str) -> str:
    return "(" + "|".join(f"{tag}{i}x{i * 7}" for i in range(SLOW_ALTERNATIVES)) + ")"


@pytest.fixture(scope="module")
def worker(tiny_model) -> Iterator[tuple[WorkerProcess, str]]:
    metrics_port = free_port()
    proc = WorkerProcess(
        "decode_service", tiny_model("qwen2"), "--role", "colocated",
        "--num-kv-blocks", str(NUM_BLOCKS), "--metrics-port", str(metrics_port),
        "--structured-outputs-backend", "xgrammar",
        "--structured-outputs-compile-timeout", str(TIMEOUT_S),
    )  # fmt: skip
    try:
        yield proc, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def router(worker, tiny_model) -> Iterator[RouterThread]:
    config = RouterConfig(
        str(tiny_model("qwen2")), port=0, grpc_port=0, colocated=[worker[0].address]
    )
    with RouterThread(config) as thread:
        yield thread


def _complete(router: RouterThread, **extra) -> str:
    client = openai.OpenAI(base_url=f"{router.base_url}/v1", api_key="none", max_retries=0)
    out = client.completions.create(
        model="", prompt="Once", temperature=1.0, max_tokens=30, extra_body=extra
    )
    return out.choices[0].text


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics: (name, its labels but role and model) -> value."""
    samples = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for s in family.samples:
            labels = sorted((k, v) for k, v in s.labels.items() if k not in ("role", "model_name"))
            samples[(s.name, tuple(labels))] = s.value
    return samples


def _counter(samples: dict, name: str, **labels: str) -> float:
    return samples.get((f"baton:structured_outputs_{name}", tuple(sorted(labels.items()))), 0.0)


def test_a_grammar_slower_than_the_timeout_is_400_naming_the_field(worker, router) -> None:
    proc, metrics_url = worker
    assert _complete(router, guided_choice=["yes", "no"]) in ("yes", "no")  # compiles in time
    before = _metrics(metrics_url)
    expected = f"grammar compile timed out after {TIMEOUT_S} s"
    with pytest.raises(openai.BadRequestError) as info:
        _complete(router, structured_outputs={"regex": _slow_regex("h")})
    error = info.value.body
    assert error["param"] == "structured_outputs.regex", error
    assert error["message"] == f"structured_outputs.regex: {expected}", error

    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.grpc_address))
    so = common_pb2.StructuredOutputs(regex=_slow_regex("g"))
    params = common_pb2.SamplingParams(max_tokens=20, structured_outputs=so)
    with pytest.raises(grpc.RpcError) as rpc:
        list(stub.Generate(router_pb2.GenerateRequest(text="Hi", params=params)))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.value.details() == f"structured_outputs.regex: {expected}"

    assert _complete(router, guided_choice=["yes", "no"]) in ("yes", "no")  # still serving
    assert_all_free({"colocated": proc.address}, NUM_BLOCKS)
    after = _metrics(metrics_url)
    for name, more in (("compile_timeouts_total", 2), ("compile_failures_total", 0)):
        assert _counter(after, name) - _counter(before, name) == more, name
    # The compiles run on (a thread cannot be stopped) and finish: their grammars are cached.
    compiled = _counter(before, "compile_seconds_count", backend="xgrammar") + 2
    deadline = time.time() + 120
    while _counter(_metrics(metrics_url), "compile_seconds_count", backend="xgrammar") < compiled:
        assert time.time() < deadline, "the timed-out compiles did not finish"
        time.sleep(0.2)


def test_the_worker_exports_structured_outputs_metrics(worker, router) -> None:
    _, metrics_url = worker
    before = _metrics(metrics_url)
    for _ in range(2):  # a spec of this test's own: one compile, then a cache hit
        assert re.fullmatch("[a-c]{2}-m", _complete(router, guided_regex="[a-c]{2}-m"))
    with pytest.raises(openai.BadRequestError, match="cannot compile"):
        _complete(router, guided_regex="(unclosed")
    after = _metrics(metrics_url)

    def delta(name: str, **labels: str) -> float:
        return _counter(after, name, **labels) - _counter(before, name, **labels)

    assert delta("compile_cache_queries_total") == 3
    assert delta("compile_cache_hits_total") == 1
    assert delta("compile_failures_total") == 1
    assert delta("requests_total", backend="xgrammar") == 2
    assert delta("compile_seconds_count", backend="xgrammar") == 1
    count = _counter(after, "compile_seconds_count", backend="xgrammar")
    seconds = _counter(after, "compile_seconds_sum", backend="xgrammar")
    assert 0 < seconds < 600 and count >= 1
    assert _counter(after, "compile_seconds_bucket", backend="xgrammar", le="+Inf") == count
    assert _counter(after, "compile_cache_hits_total") <= _counter(
        after, "compile_cache_queries_total"
    )
