"""The router against real worker processes: outputs equal the offline `LLM`, over HTTP (the
official openai client, streamed and not) and gRPC, for a prefill/decode pair and a colocated
worker; stop strings, n > 1, logprobs, cached tokens; disconnects free every block; overload
is a 429; a failed prefill is retried on another prefill worker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from concurrent import futures
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine import LLM, SamplingParams
from proto.baton.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from router.config import RouterConfig
from router.testing import RouterThread, free_ports
from tests.workers import ROOT, started_at_once

NUM_BLOCKS = 64
FLAGS = ("--num-kv-blocks", str(NUM_BLOCKS))
PROMPTS = ["Once upon a time", "The quick brown fox jumps over", "Hello! How are you today?"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
LONG_PROMPT = "The people of the town woke up early and went out in their boats. " * 4


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def workers(model_dir):
    """decode, prefill, colocated, and a colocated worker that refuses everything (overloaded)."""
    specs = {
        "decode": ("decode_service", FLAGS),
        "prefill": ("prefill_service", FLAGS),
        "colocated": ("decode_service", (*FLAGS, "--role", "colocated")),
        "overloaded": ("decode_service", (*FLAGS, "--role", "colocated", "--max-num-waiting", "0")),
    }
    with started_at_once(model_dir, specs) as addresses:
        yield addresses


@pytest.fixture(scope="module")
def routers(model_dir, workers):
    configs = {
        "disaggregated": _config(
            model_dir, prefill=[workers["prefill"]], decode=[workers["decode"]]
        ),
        "colocated": _config(model_dir, colocated=[workers["colocated"]]),
    }
    threads = {name: RouterThread(config) for name, config in configs.items()}
    for thread in threads.values():
        thread.__enter__()
    yield threads
    for thread in threads.values():
        thread.stop()


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir))


@pytest.fixture(params=["disaggregated", "colocated"])
def router(request, routers) -> RouterThread:
    return routers[request.param]


def _config(model_dir, **kwargs) -> RouterConfig:
    """A router config on free HTTP and gRPC ports."""
    return RouterConfig(str(model_dir), port=0, grpc_port=0, **kwargs)


def _client(router: RouterThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.base_url}/v1", api_key="none", max_retries=0)


def _model(router: RouterThread) -> str:
    return router.config.served_model_name


def _offline(llm: LLM, prompt, **params):
    return llm.generate([prompt], SamplingParams(**params), use_tqdm=False)[0]


def test_completions_match_offline(router, llm):
    client, model = _client(router), _model(router)
    token_prompt = llm.get_tokenizer().encode(PROMPTS[1])
    for prompt in [*PROMPTS, token_prompt]:
        expected = _offline(llm, prompt, temperature=0, max_tokens=20)
        out = client.completions.create(model=model, prompt=prompt, max_tokens=20, temperature=0)
        assert out.choices[0].text == expected.outputs[0].text
        assert out.choices[0].finish_reason == expected.outputs[0].finish_reason
        assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert out.usage.completion_tokens == len(expected.outputs[0].token_ids)
        chunks = list(
            client.completions.create(
                model=model, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.outputs[0].text
        assert chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_several_prompts_and_echo(router, llm):
    client, model = _client(router), _model(router)
    expected = [_offline(llm, p, temperature=0, max_tokens=6).outputs[0].text for p in PROMPTS]
    out = client.completions.create(model=model, prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == expected
    echoed = client.completions.create(
        model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPTS[0] + expected[0]


def test_chat_matches_offline(router, llm):
    client, model = _client(router), _model(router)
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = llm.chat(CHAT, params, use_tqdm=False)[0]
    out = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0)
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected.outputs[0].text
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    stream = client.chat.completions.create(
        model=model, messages=CHAT, max_completion_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.outputs[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == out.usage.total_tokens
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    expected = llm.chat(CHAT, params, use_tqdm=False, tools=tools)[0]
    out = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=24, temperature=0, tools=tools, tool_choice="none"
    )
    assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert out.choices[0].message.content == expected.outputs[0].text


def test_grpc_matches_offline(router, llm):
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.grpc_address))
    params = common_pb2.SamplingParams(temperature=0, max_tokens=16)
    expected = _offline(llm, PROMPTS[0], temperature=0, max_tokens=16).outputs[0]
    replies = list(stub.Generate(router_pb2.GenerateRequest(text=PROMPTS[0], params=params)))
    assert "".join(r.text for r in replies) == expected.text
    assert [t for r in replies for t in r.token_ids] == expected.token_ids
    assert replies[-1].finish_reason == "length" and replies[-1].usage.completion_tokens == 16
    assert all(not r.HasField("usage") for r in replies[:-1])
    chat = router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(**m) for m in CHAT])
    replies = list(stub.Generate(router_pb2.GenerateRequest(chat=chat, params=params)))
    expected = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "".join(r.text for r in replies) == expected.outputs[0].text


def test_sampling_features_match_offline(router, llm):
    client, model = _client(router), _model(router)
    prompt = PROMPTS[0]
    full = _offline(llm, prompt, temperature=0, max_tokens=20).outputs[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # a stop string the output really contains
    expected = _offline(llm, prompt, temperature=0, max_tokens=20, stop=[stop]).outputs[0]
    for stream in (False, True):
        out = client.completions.create(
            model=model, prompt=prompt, max_tokens=20, temperature=0, stop=[stop], stream=stream
        )
        choices = [c.choices[0] for c in out if c.choices] if stream else out.choices
        assert "".join(c.text for c in choices) == expected.text
        assert choices[-1].finish_reason == "stop"
    seeded = dict(temperature=0.9, top_k=20, seed=7, max_tokens=12, n=3, frequency_penalty=0.4)
    expected_n = _offline(llm, prompt, **seeded).outputs
    out = client.completions.create(model=model, prompt=prompt, extra_body={"top_k": 20}, **{
        k: v for k, v in seeded.items() if k != "top_k"
    })  # fmt: skip
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [
        e.text for e in expected_n
    ]
    assert out.usage.completion_tokens == sum(len(e.token_ids) for e in expected_n)


def test_logprobs_match_offline(router, llm):
    client, model = _client(router), _model(router)
    expected = _offline(llm, PROMPTS[2], temperature=0, max_tokens=5, logprobs=2).outputs[0]
    out = client.completions.create(
        model=model, prompt=PROMPTS[2], max_tokens=5, temperature=0, logprobs=2
    )
    logprobs = out.choices[0].logprobs
    pairs = zip(expected.token_ids, expected.logprobs, strict=True)
    want = [entry[tok].logprob for tok, entry in pairs]
    assert logprobs.token_logprobs == pytest.approx(want, abs=1e-5)
    assert all(len(top) == 2 or len(top) == 3 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(
        model=model, messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy


def test_cached_tokens_reported(router):
    client, model = _client(router), _model(router)
    usages = [
        client.completions.create(model=model, prompt=LONG_PROMPT, max_tokens=2).usage
        for _ in range(2)
    ]
    assert usages[0].prompt_tokens == usages[1].prompt_tokens > 32
    assert usages[1].prompt_tokens_details.cached_tokens >= 32  # whole blocks of the prefix
    salted = client.completions.create(
        model=model, prompt=LONG_PROMPT, max_tokens=2, extra_body={"cache_salt": "tenant-b"}
    )
    assert salted.usage.prompt_tokens_details.cached_tokens == 0  # another salt shares nothing


def _load(address: str, role: str) -> common_pb2.Load:
    stub_type: Any = {
        "decode": worker_pb2_grpc.DecodeWorkerStub,
        "prefill": worker_pb2_grpc.PrefillWorkerStub,
        "colocated": worker_pb2_grpc.ColocatedWorkerStub,
    }[role]
    with grpc.insecure_channel(address) as channel:
        return stub_type(channel).GetLoad(common_pb2.LoadRequest(), timeout=5)


def _assert_all_free(workers, timeout_s: float = 10.0) -> None:
    deadline = time.time() + timeout_s
    for role in ("decode", "prefill", "colocated"):
        while True:
            load = _load(workers[role], role)
            idle = not (load.num_reserved or load.num_running or load.num_waiting)
            if idle and load.num_free_blocks == load.num_total_blocks == NUM_BLOCKS:
                break
            assert time.time() < deadline, f"{role} still holds blocks: {load}"
            time.sleep(0.05)


def test_disconnect_mid_stream_frees_every_block(router, workers):
    body = {"prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{router.base_url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        for i, _ in enumerate(response.iter_lines()):
            if i >= 6:
                break  # leave mid-stream: closing the connection must abort everywhere
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.grpc_address))
    params = common_pb2.SamplingParams(max_tokens=900, ignore_eos=True)
    call = stub.Generate(router_pb2.GenerateRequest(text=PROMPTS[1], params=params))
    next(call), next(call)
    call.cancel()
    _assert_all_free(workers)


def test_overloaded_worker_is_429(model_dir, workers):
    config = _config(model_dir, colocated=[workers["overloaded"]])
    with RouterThread(config) as router:
        for stream in (False, True):
            body = {"prompt": PROMPTS[0], "max_tokens": 4, "stream": stream}
            response = httpx.post(f"{router.base_url}/v1/completions", json=body)
            assert response.status_code == 429, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.grpc_address))
        with pytest.raises(grpc.RpcError) as error:
            params = common_pb2.SamplingParams(max_tokens=4)
            list(stub.Generate(router_pb2.GenerateRequest(text=PROMPTS[0], params=params)))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


class _FailingPrefill(worker_pb2_grpc.PrefillWorkerServicer):
    """A prefill worker whose KV transfers always fail (UNAVAILABLE): fault injection."""

    def __init__(self) -> None:
        self.calls = 0

    def Prefill(self, request, context):  # noqa: N802
        self.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "KV transfer failed: injected")

    def SetTarget(self, request, context):  # noqa: N802
        return worker_pb2.PrefillTargetAck()

    def Abort(self, request, context):  # noqa: N802
        return common_pb2.AbortResponse()

    def GetLoad(self, request, context):  # noqa: N802
        return common_pb2.Load(
            num_free_blocks=NUM_BLOCKS, num_total_blocks=NUM_BLOCKS, block_size=16,
            role="prefill", max_model_len=4096,
        )  # fmt: skip


@pytest.fixture
def failing_prefill():
    servicer = _FailingPrefill()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_failed_prefill_is_retried_on_another(model_dir, workers, failing_prefill, llm):
    servicer, address = failing_prefill
    config = _config(
        model_dir,
        prefill=[address, workers["prefill"]],
        decode=[workers["decode"]],
        policy="round_robin",
    )
    expected = _offline(llm, PROMPTS[0], temperature=0, max_tokens=8).outputs[0].text
    with RouterThread(config) as router:
        client = _client(router)
        for _ in range(2):  # round robin: one of the two starts on the failing worker
            out = client.completions.create(
                model=_model(router), prompt=PROMPTS[0], max_tokens=8, temperature=0
            )
            assert out.choices[0].text == expected
    assert servicer.calls >= 1
    _assert_all_free(workers)


def test_failed_prefill_without_retry_frees_the_reservation(model_dir, workers, failing_prefill):
    _, address = failing_prefill
    config = _config(model_dir, prefill=[address], decode=[workers["decode"]])
    with RouterThread(config) as router:
        body = {"prompt": PROMPTS[0], "max_tokens": 8}
        response = httpx.post(f"{router.base_url}/v1/completions", json=body)
        assert response.status_code == 503, response.text
        assert "KV transfer failed" in response.json()["error"]["message"]
    _assert_all_free(workers)


def test_prompt_longer_than_the_context_is_400(router):
    body = {"prompt": [5] * 4096, "max_tokens": 1}
    response = httpx.post(f"{router.base_url}/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert "context" in response.json()["error"]["message"]


def test_metrics_count_requests(router):
    _client(router).completions.create(model=_model(router), prompt=PROMPTS[0], max_tokens=3)
    text = httpx.get(f"{router.base_url}/metrics").text
    for name in (
        "baton:time_to_first_token_seconds_count",
        "baton:inter_token_latency_seconds_count",
        "baton:e2e_request_latency_seconds_count",
        "baton:prompt_tokens_total",
        "baton:generation_tokens_total",
        'baton:request_success_total{finished_reason="length"',
        "baton:num_requests_running",
    ):
        assert name in text, name


def _wait_healthy(base_url: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "router exited"
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the router did not become healthy")


def test_sigterm_drains_in_flight_requests(model_dir, workers):
    http_port, grpc_port = free_ports(2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "router", "--model", str(model_dir),
         "--colocated", workers["colocated"], "--port", str(http_port),
         "--grpc-port", str(grpc_port), "--drain-grace", "30"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        _wait_healthy(base_url, proc)
        body = {"prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line)
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)  # mid-stream: the stream must still complete
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base_url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
