"""Prefix-aware routing through real clusters: in-process index, Redis with two routers, Redis
going away and coming back, conditional disaggregation."""

from __future__ import annotations

import random
import re
import time

import httpx
import pytest

from cluster import ClusterSpec, free_port, free_port_run, start_cluster
from engine import LLM, SamplingParams

FLAGS = ["--num-kv-blocks", "128", "--max-num-batched-tokens", "64"]


def _complete(base: str, model: str, prompt: list[int], max_tokens: int = 4) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    response = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _cached(result: dict) -> int:
    return result["usage"]["prompt_tokens_details"]["cached_tokens"]


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return sum(float(v) for v in values)


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(n)]


@pytest.fixture(scope="module")
def memory_cluster(tiny_model):
    model = tiny_model("qwen2")
    spec = ClusterSpec(model, prefill=2, decode=1, port=free_port(), grpc_port=free_port(),
                       worker_args=FLAGS)  # fmt: skip
    cluster = start_cluster(spec)
    yield model, f"http://127.0.0.1:{spec.port}", cluster
    cluster.stop()


def test_repeat_prefixes_go_where_their_kv_is(memory_cluster):
    model, base, _ = memory_cluster
    shared = _prompt(1, 64)  # 4 full blocks
    _complete(base, model.name, shared + _prompt(2, 5))
    # Once the first request's KV events reached the router's index (the workers may still be
    # connecting to the router just after start), every repeat goes to the holder.
    assert _wait_for(lambda: _cached(_complete(base, model.name, shared + [9])) == 64)
    hits = [_cached(_complete(base, model.name, shared + _prompt(10 + i, 5))) for i in range(6)]
    assert hits == [64] * 6  # prefix_aware sends every one to the prefill worker that has it


def test_multi_turn_prefills_on_the_decode_worker(memory_cluster):
    model, base, _ = memory_cluster
    before = _metric(base, "baton:local_prefills_total")
    first = _prompt(3, 70)
    answer = _complete(base, model.name, first, max_tokens=20)
    llm = LLM(str(model))
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    turn1 = llm.generate([first], greedy, use_tqdm=False)[0].outputs[0]
    assert answer["choices"][0]["text"] == turn1.text
    time.sleep(0.3)
    second = first + turn1.token_ids + _prompt(4, 10)  # the conversation goes on
    result = _complete(base, model.name, second, max_tokens=8)
    assert _metric(base, "baton:local_prefills_total") == before + 1
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = llm.generate([second], params, use_tqdm=False)[0].outputs[0].text
    assert result["choices"][0]["text"] == expected
    assert _cached(result) >= 64


def test_a_prefix_held_by_the_decode_worker_is_reused_there(memory_cluster):
    """A prompt no decode worker holds is reserved while it prefills (fresh blocks); once the
    decode worker holds its prefix, the router reserves first and the decode worker reuses it
    (the prefill worker sends only the rest); the text is the offline engine's either way."""
    model, base, cluster = memory_cluster
    decode = next(w for w in cluster.workers if w.role == "decode")

    def decode_hits() -> float:
        text = httpx.get(decode.metrics_url, timeout=10).text
        return sum(
            float(v) for v in re.findall(r"^baton:prefix_cache_hits_total\S* (\S+)$", text, re.M)
        )

    llm = LLM(str(model))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    shared = _prompt(20, 64)  # 4 full blocks, then more than the local-prefill threshold
    first = shared + _prompt(21, 80)
    assert _complete(base, model.name, first, 6)["choices"][0]["text"] == (
        llm.generate([first], greedy, use_tqdm=False)[0].outputs[0].text)  # fmt: skip
    before, local = decode_hits(), _metric(base, "baton:local_prefills_total")
    prompts = [shared + _prompt(30 + i, 80) for i in range(20)]
    for prompt in prompts:  # until the router's index has the decode worker's KV events
        result = _complete(base, model.name, prompt, 6)
        assert result["choices"][0]["text"] == (
            llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].text)  # fmt: skip
        if decode_hits() >= before + 64:
            break
    assert decode_hits() >= before + 64
    assert _metric(base, "baton:local_prefills_total") == local  # disaggregated, not local


@pytest.fixture()
def redis_cluster(tiny_model, redis_server):
    model = tiny_model("qwen2")
    port = free_port_run(2)  # the two routers listen on port and port + 1
    spec = ClusterSpec(model, prefill=2, decode=1, port=port,
                       grpc_port=free_port_run(2, avoid=range(port, port + 2)), routers=2,
                       redis_url=redis_server.url, worker_args=FLAGS)  # fmt: skip
    cluster = start_cluster(spec)
    bases = [f"http://127.0.0.1:{port}" for port, _ in spec.router_ports()]
    yield model, bases, redis_server
    cluster.stop()


def test_two_routers_share_one_redis_index(redis_cluster):
    model, (base_a, base_b), _ = redis_cluster
    shared = _prompt(5, 48)
    _complete(base_a, model.name, shared + [7])
    assert _wait_for(lambda: _cached(_complete(base_a, model.name, shared + [9])) == 48)
    results = [_complete(b, model.name, shared + [8 + i]) for i, b in enumerate([base_b, base_a])]
    assert [_cached(r) for r in results] == [48, 48]  # both routers chose the holder


def test_redis_outage_fails_no_request_and_routing_recovers(redis_cluster):
    model, (base, _), redis_server = redis_cluster
    shared = _prompt(6, 48)
    _complete(base, model.name, shared + [1])
    redis_server.stop()
    for i in range(4):  # load-only routing meanwhile: every request still succeeds
        _complete(base, model.name, _prompt(100 + i, 20))
    assert _metric(base, "baton:prefix_index_available") == 0
    redis_server.start()  # empty: the workers' publishers resync their block sets
    probe = _prompt(200, 20)  # a full block, so the router asks the index
    assert _wait_for(lambda: _complete(base, model.name, probe) and (
        _metric(base, "baton:prefix_index_available") == 1))  # fmt: skip
    time.sleep(1.5)
    hits = [_cached(_complete(base, model.name, shared + [50 + i])) for i in range(4)]
    assert hits == [48] * 4
