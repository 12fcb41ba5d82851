"""`baton serve` end to end: the CLI starts router and workers, serves load, and drains."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from cluster import free_port
from engine import LLM, SamplingParams
from tests.workers import ROOT, lines_until_serving, stop_serve

NUM_REQUESTS = 32


@pytest.fixture(scope="module")
def cluster(tiny_model):
    model_dir = tiny_model("qwen2")
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launcher",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--num-kv-blocks",
            "256",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines = lines_until_serving(proc)
    yield model_dir, f"http://127.0.0.1:{port}", lines, proc
    if proc.poll() is None:
        stop_serve(proc)


def test_serve_prints_endpoints(cluster):
    _, base, lines, _ = cluster
    text = "".join(lines)
    assert f"{base}/v1" in text and "prefill" in text and "decode" in text


def test_concurrent_requests_all_complete_and_match_offline(cluster):
    model_dir, base, _, _ = cluster
    prompts = [[5 + i, 6 + i, 7 + i] + list(range(40, 40 + i)) for i in range(NUM_REQUESTS)]

    async def one(client, prompt):
        body = {
            "model": model_dir.name,
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        }
        response = await client.post(f"{base}/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    texts = asyncio.run(run())
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    offline = LLM(str(model_dir)).generate(prompts, params, use_tqdm=False)
    assert texts == [o.outputs[0].text for o in offline]


def test_sigterm_drains_and_stops_everything(cluster):
    _, base, lines, proc = cluster
    workers = [line.split()[1] for line in lines if line.split()[:1] in (["prefill"], ["decode"])]
    assert len(workers) == 2
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/health", timeout=2)
    for address in workers:  # the worker processes are gone too
        host, port = address.rsplit(":", 1)
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=1).close()


def test_workers_are_spread_over_gpus():
    from cluster import gpu_for_worker

    assert [gpu_for_worker(i, 2) for i in range(2)] == [0, 1]  # prefill, decode: distinct
    assert [gpu_for_worker(i, 2) for i in range(4)] == [0, 1, 0, 1]
    assert [gpu_for_worker(i, 1) for i in range(2)] == [0, 0]  # one GPU: shared
    assert gpu_for_worker(0, 0) is None  # CPU


def test_decode_workers_pick_their_kv_transport_by_placement():
    from cluster import kv_transport_args

    assert kv_transport_args("decode", 1, {0}) == ["--kv-transport", "nccl"]  # own GPU
    assert kv_transport_args("decode", 0, {0}) == ["--kv-transport", "cuda-ipc"]  # shared GPU
    assert kv_transport_args("decode", 0, {0, 1}) == []  # prefill here and elsewhere: tcp
    assert kv_transport_args("decode", None, {None}) == []  # CPU: tcp
    assert kv_transport_args("decode", 0, {0}, forced="tcp") == ["--kv-transport", "tcp"]
    assert kv_transport_args("prefill", 1, {0}) == []
    assert kv_transport_args("prefill", 0, {0}, forced="nccl") == []
    assert kv_transport_args("colocated", 1, {0}) == []


def test_a_forced_kv_transport_that_cannot_work_is_refused_before_any_worker_starts(tiny_model):
    from cluster import ClusterSpec, start_cluster

    model = tiny_model("llama")
    for transport, match in (("cuda-ipc", "needs GPU workers"), ("rdma", "must be one of")):
        spec = ClusterSpec(model, num_gpus=0, kv_transport=transport)
        with pytest.raises(ValueError, match=f"kv_transport.*{match}"):
            start_cluster(spec)


def test_prefill_args_reach_only_prefill_workers(tiny_model):
    """`ClusterSpec.prefill_args` (here --layerwise-push) go to prefill workers, which the
    decode worker would refuse; the served output equals the offline engine's."""
    from cluster import ClusterSpec, start_cluster

    model_dir = tiny_model("qwen2")
    spec = ClusterSpec(model_dir, port=free_port(), grpc_port=free_port(), num_gpus=0,
                       prefill_args=["--layerwise-push"],
                       router_args=["--local-prefill-threshold", "0"])  # fmt: skip
    prompts = [list(range(5, 5 + n)) for n in (30, 70)]
    cluster = start_cluster(spec)
    try:
        texts = []
        for prompt in prompts:
            body = {"model": model_dir.name, "prompt": prompt, "max_tokens": 8,
                    "temperature": 0, "ignore_eos": True}  # fmt: skip
            response = httpx.post(f"http://127.0.0.1:{spec.port}/v1/completions", json=body,
                                  timeout=60)  # fmt: skip
            texts.append(response.json()["choices"][0]["text"])
    finally:
        cluster.stop(grace_s=5)
    llm = LLM(str(model_dir))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert texts == [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
