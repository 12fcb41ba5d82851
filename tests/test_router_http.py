"""The router's API layer without usable workers: OpenAI-shaped errors (400 naming the field,
404, 503), models, health, metrics, and the gRPC front's status codes, health and reflection."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proto.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.testing import RouterThread, free_ports

CONTEXT = 64  # tokens: max_model_len given on the command line, so prompts can be checked


@pytest.fixture(scope="module")
def dead_worker() -> str:
    """An address nobody listens on."""
    return f"127.0.0.1:{free_ports(1)[0]}"


@pytest.fixture(scope="module")
def router(tiny_model, dead_worker):
    config = RouterConfig(
        str(tiny_model("qwen2")), colocated=[dead_worker], port=0, grpc_port=0,
        max_model_len=CONTEXT, poll_interval_s=0.2,
    )  # fmt: skip
    with RouterThread(config) as thread:
        yield thread


def _post(router, path: str, body) -> httpx.Response:
    if isinstance(body, str):
        headers = {"content-type": "application/json"}
        return httpx.post(f"{router.base_url}{path}", content=body, headers=headers, timeout=10)
    return httpx.post(f"{router.base_url}{path}", json=body, timeout=10)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": "hi", "n": True}, "n"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "hi", "stop": 5}, "stop"),
        ({}, "prompt"),
        ({"prompt": {"text": "hi"}}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [100000]}, "prompt"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "n": 2, "temperature": 0}, "n"),
        ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"),
        ({"prompt": "hi", "stop_token_ids": [100000]}, "stop_token_ids"),
        ({"prompt": "hi " * CONTEXT}, "prompt"),
    ],
)
def test_bad_completion_requests_are_400_naming_the_field(router, body, param):
    error = _error(_post(router, "/v1/completions", body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
         "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages.0.content"),
    ],
)  # fmt: skip
def test_bad_chat_requests_are_400_naming_the_field(router, body, param):
    assert _error(_post(router, "/v1/chat/completions", body), 400)["param"] == param


def test_malformed_json_is_400(router):
    error = _error(_post(router, "/v1/completions", '{"prompt": "hi",'), 400)
    assert "JSON" in error["message"]
    form = httpx.post(f"{router.base_url}/v1/completions", data={"prompt": "hi"})
    assert "JSON object" in _error(form, 400)["message"]


def test_unknown_model_is_404(router):
    chat = {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}
    for path, body in [
        ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}),
        ("/v1/chat/completions", chat),
    ]:
        error = _error(_post(router, path, body), 404)
        assert error["code"] == "model_not_found" and "gpt-9" in error["message"]


def test_no_healthy_worker_is_503(router, dead_worker):
    for stream in (False, True):
        body = {"prompt": "hi", "max_tokens": 2, "stream": stream}
        error = _error(_post(router, "/v1/completions", body), 503)
        assert dead_worker in error["message"]
    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    _error(_post(router, "/v1/chat/completions", chat), 503)
    _error(httpx.get(f"{router.base_url}/health"), 503)


def test_models_and_unknown_routes(router):
    models = httpx.get(f"{router.base_url}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [router.config.served_model_name]
    assert models["data"][0]["max_model_len"] == CONTEXT
    _error(httpx.get(f"{router.base_url}/v1/nothing"), 404)
    _error(httpx.get(f"{router.base_url}/v1/completions"), 405)


def test_metrics_are_prometheus_text(router, dead_worker):
    response = httpx.get(f"{router.base_url}/metrics")
    assert response.status_code == 200
    assert "text/plain" in response.headers["content-type"]
    assert f'baton:worker_healthy{{address="{dead_worker}",role="colocated"}} 0.0' in response.text
    assert "baton:request_failure_total" in response.text


def _generate(router, request: router_pb2.GenerateRequest) -> grpc.RpcError:
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.grpc_address))
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request, timeout=10))
    return error.value


def test_grpc_status_codes(router):
    cases = [
        (router_pb2.GenerateRequest(text="hi", model="gpt-9"), grpc.StatusCode.NOT_FOUND),
        (router_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            router_pb2.GenerateRequest(text="hi", params=common_pb2.SamplingParams(top_p=2)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            router_pb2.GenerateRequest(token_ids=router_pb2.TokenIds(ids=[1] * CONTEXT)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (router_pb2.GenerateRequest(text="hi"), grpc.StatusCode.UNAVAILABLE),
    ]
    for request, code in cases:
        assert _generate(router, request).code() == code


def test_grpc_health_and_reflection(router):
    channel = grpc.insecure_channel(router.grpc_address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "baton.v1.Router"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(reflection.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"baton.v1.Router", "grpc.health.v1.Health"} <= names
