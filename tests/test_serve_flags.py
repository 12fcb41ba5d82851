"""`baton serve`'s flags reach the processes they concern. One cluster, started through the CLI
with a --config YAML file plus flags that override some of its values and the API key in
$BATON_API_KEY; each worker's engine configuration is read back from its /metrics info gauges,
the router's from its API: served model name, chat template, API key (HTTP and gRPC),
/tokenize and /detokenize."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cluster import free_port
from proto.baton.v1 import router_pb2, router_pb2_grpc
from tests.workers import ROOT, lines_until_serving

KEY = "sk-test-0123456789"
NAME = "tiny-served"
TEMPLATE = (
    "{% for m in messages %}<<{{ m['role'] }}|{{ m['content'] }}>>{% endfor %}"
    "{% if add_generation_prompt %}[[go]]{% endif %}"
)
CONFIG = {  # the YAML file: `-` and `_` spellings both
    "dtype": "bfloat16",
    "max-model-len": 512,  # overridden below
    "block_size": 8,
    "gpu-memory-utilization": 0.5,
    "enable_prefix_caching": False,
    "scheduling_policy": "priority",  # overridden below
    "seed": 7,
    "served_model_name": NAME,
    "enforce-eager": True,
    "max_num_seqs": 5,
    "max_num_batched_tokens": 300,
    "num_kv_blocks": 100,  # overridden below
    "max_num_waiting": 50,
    "kv_cache_memory_bytes": "64MiB",
    "chat_template": TEMPLATE,
    "kv_transport": "tcp",
    "kernel-backend": "torch",
    "pdl": False,
    "structured-outputs-backend": "xgrammar",
    "structured_outputs_disable_fallback": True,
    "structured_outputs_compile_timeout": 12.5,
}
OVERRIDES = ["--max-model-len", "384", "--num-kv-blocks", "120", "--scheduling-policy", "fair"]
CACHE_INFO = {
    "block_size": "8",
    "gpu_memory_utilization": "0.5",
    "enable_prefix_caching": "False",
    "kv_cache_memory_bytes": str(64 * 2**20),
    "num_gpu_blocks": "120",
}
ENGINE_INFO = {
    "served_model_name": NAME,
    "dtype": "bfloat16",
    "max_model_len": "384",
    "seed": "7",
    "enforce_eager": "True",
    "max_num_seqs": "5",
    "max_num_batched_tokens": "300",
    "max_num_waiting": "50",
    "scheduling_policy": "fair",
    "kernel_backend": "torch",  # what runs: on this CPU every switch of the GPU path is off
    "fuse_gate_up": "False",
    "fold_norms": "False",
    "pdl": "False",
    "structured_outputs_backend": "xgrammar",
    "structured_outputs_disable_fallback": "True",
    "structured_outputs_compile_timeout_s": "12.5",
}


@dataclass
class Served:
    base: str  # http://host:port
    grpc_address: str
    metrics_urls: dict[str, str]  # role -> a worker's /metrics


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory) -> Iterator[Served]:
    config = tmp_path_factory.mktemp("serve-config") / "baton.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model("qwen2")), **CONFIG}))
    port, grpc_port = free_port(), free_port()
    argv = ["serve", "--config", str(config), "--port", str(port), "--grpc-port", str(grpc_port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", *argv, *OVERRIDES],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "BATON_API_KEY": KEY},
    )  # fmt: skip
    lines = lines_until_serving(proc)
    roles = ("prefill", "decode")
    urls = {w[0]: w[-1].rstrip(")") for w in map(str.split, lines) if w and w[0] in roles}
    try:
        yield Served(f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}", urls)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _info_labels(metrics_url: str, name: str) -> dict[str, str]:
    text = httpx.get(metrics_url, timeout=10).text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == name]
    (sample,) = family.samples
    assert sample.value == 1
    return dict(sample.labels)


def test_every_engine_flag_reaches_every_worker(served: Served) -> None:
    assert sorted(served.metrics_urls) == ["decode", "prefill"]
    for role, url in served.metrics_urls.items():
        cache = _info_labels(url, "baton:cache_config_info")
        engine = _info_labels(url, "baton:engine_config_info")
        assert {k: cache[k] for k in CACHE_INFO} == CACHE_INFO, role
        assert {k: engine[k] for k in ENGINE_INFO} == ENGINE_INFO, role


def test_the_api_key_guards_v1_and_leaves_the_rest_open(served: Served) -> None:
    client = openai.OpenAI(base_url=f"{served.base}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [NAME]
    completion = client.completions.create(model=NAME, prompt="hello", max_tokens=3)
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    wrong = openai.OpenAI(base_url=f"{served.base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.status_code == 401
    response = httpx.post(f"{served.base}/v1/completions", json={"prompt": "hi"}, timeout=10)
    assert response.status_code == 401
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(served.base + path, timeout=10).status_code == 200, path
    body = {"prompt": "hi"}
    assert httpx.post(f"{served.base}/tokenize", json=body, timeout=10).status_code == 200


def test_the_api_key_guards_grpc_generate(served: Served) -> None:
    request = router_pb2.GenerateRequest(text="hello")
    request.params.max_tokens = 2
    with grpc.insecure_channel(served.grpc_address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for metadata in (None, [("authorization", "Bearer sk-wrong")]):
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request, metadata=metadata, timeout=30))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = list(stub.Generate(request, metadata=[("authorization", f"Bearer {KEY}")]))
        assert sum(len(m.token_ids) for m in answer) == 2
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_the_api_key_is_on_no_command_line(served: Served) -> None:
    """`ps` shows command lines to every user: the key travels in the router's environment."""
    cmdlines = []
    for proc in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdlines.append(proc.read_bytes())
        except OSError:  # the process ended
            continue
    assert cmdlines and not [c for c in cmdlines if KEY.encode() in c]


def test_the_chat_template_override_and_a_tokenize_round_trip(served: Served) -> None:
    def post(path: str, body: dict) -> dict:
        response = httpx.post(served.base + path, json=body, timeout=10)
        assert response.status_code == 200, response.text
        return response.json()

    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}
    rendered = post("/tokenize", {**chat, "return_token_strs": True})
    assert rendered["count"] == len(rendered["tokens"]) == len(rendered["token_strs"])
    assert rendered["max_model_len"] == 384
    assert post("/detokenize", {"tokens": rendered["tokens"]}) == {"prompt": "<<user|hi>>[[go]]"}
    text = "The quick brown fox jumps over the lazy dog."
    plain = post("/tokenize", {"prompt": text, "add_special_tokens": False})
    assert plain["token_strs"] is None
    assert post("/detokenize", {"model": NAME, "tokens": plain["tokens"]}) == {"prompt": text}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": 3}, 400, "prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "model"),
        ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ],
)
def test_bad_tokenize_requests_name_the_field(served, path, body, status, param) -> None:
    response = httpx.post(served.base + path, json=body, timeout=10)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
