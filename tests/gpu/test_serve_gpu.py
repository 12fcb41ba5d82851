"""`baton serve`'s cluster on the GPU machine: output equals the offline engine's, with prefill and
decode sharing one GPU (KV over CUDA IPC, their default there, or over TCP when asked) and on two
GPUs (KV over NCCL)."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(
    ("num_gpus", "forced", "transport"),
    [(1, "", "cuda-ipc"), (1, "tcp", "tcp"), (2, "", "nccl")],
    ids=["one-gpu-cuda-ipc", "one-gpu-tcp", "two-gpus-nccl"],
)
def test_disaggregated_on_gpus_equals_offline(tiny_model, num_gpus, forced, transport):
    if torch.cuda.device_count() < num_gpus:
        pytest.skip(f"needs {num_gpus} GPUs")
    from cluster import ClusterSpec, free_port, start_cluster
    from engine import LLM, SamplingParams

    model = tiny_model("qwen2")
    spec = ClusterSpec(model, prefill=1, decode=1, port=free_port(), grpc_port=free_port(),
                       worker_args=["--gpu-memory-utilization", "0.3"],
                       num_gpus=num_gpus, kv_transport=forced)  # fmt: skip
    prompts = [[5 + i] * (10 + 7 * i) for i in range(4)]
    cluster = start_cluster(spec)
    try:
        assert [w.device for w in cluster.workers] == [f"gpu {i % num_gpus}" for i in range(2)]
        decode_args = cluster.workers[1].proc.args
        assert decode_args[decode_args.index("--kv-transport") + 1] == transport
        texts = []
        for prompt in prompts:
            body = {"model": model.name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            request = urllib.request.Request(
                f"http://127.0.0.1:{spec.port}/v1/completions",
                data=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=120) as response:
                texts.append(json.loads(response.read())["choices"][0]["text"])
    finally:
        cluster.stop()
    llm = LLM(str(model), device="cuda", kv_cache_memory_bytes=1 << 28)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    assert texts == [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
