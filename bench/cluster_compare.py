"""Disaggregated against colocated on one machine: TTFT and output tokens/s, same workload.

Starts each configuration in turn with `baton serve`'s launcher (1 prefill + 1 decode worker;
2 colocated workers), sends the same requests to the router's OpenAI streaming endpoint at a
fixed concurrency, and measures per request the time to first token (first streamed chunk) and
end-to-end latency, and overall output tokens per second. Prompts are random token ids (seeded)
of lengths uniform in [min, max]; outputs have a fixed length (eos ignored), greedy.

    python -m bench.cluster_compare [--model DIR] [--num-requests 32] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.machine import describe_machine
from launcher.serve import ClusterSpec, free_port, start_cluster

CONFIGS = {
    "1P+1D": {"prefill": 1, "decode": 1, "colocated": 0},
    "2 colocated": {"prefill": 0, "decode": 0, "colocated": 2},
}


async def one_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> dict[str, float]:
    """Stream one completion; TTFT (s), end-to-end latency (s) and completion tokens."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("choices") and ttft is None:
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft": ttft or 0.0, "e2e": time.perf_counter() - start, "tokens": tokens}


async def run_load(base: str, model: str, prompts: list[list[int]], output_len: int, conc: int):
    sem = asyncio.Semaphore(conc)
    async with httpx.AsyncClient(timeout=600) as client:

        async def limited(prompt: list[int]) -> dict[str, float]:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": output_len,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with sem:
                return await one_request(client, f"{base}/v1/completions", body)

        start = time.perf_counter()
        results = await asyncio.gather(*(limited(p) for p in prompts))
        return results, time.perf_counter() - start


def summarize(results: list[dict[str, float]], seconds: float) -> dict[str, Any]:
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "seconds": seconds,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds,
        "ttft_mean_s": statistics.fmean(ttfts),
        "ttft_p50_s": ttfts[len(ttfts) // 2],
        "ttft_p90_s": ttfts[int(len(ttfts) * 0.9)],
        "e2e_mean_s": statistics.fmean(r["e2e"] for r in results),
    }


def run_config(name: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, Any]:
    spec = ClusterSpec(
        model=args.model,
        port=free_port(),
        grpc_port=free_port(),
        **CONFIGS[name],
        worker_args=["--max-num-batched-tokens", str(args.max_num_batched_tokens)],
    )
    cluster = start_cluster(spec)
    try:
        base = f"http://127.0.0.1:{spec.port}"
        warm = [[p[0]] * 8 for p in prompts[:2]]
        asyncio.run(run_load(base, args.model.name, warm, 2, 2))
        results, seconds = asyncio.run(
            run_load(base, args.model.name, prompts, args.output_len, args.concurrency)
        )
    finally:
        cluster.stop()
    return summarize(results, seconds)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the demo model")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--min-prompt", type=int, default=128)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/cluster_compare_cpu.json"))
    args = parser.parse_args(argv)
    if args.model is None:
        from engine.models.demo import ensure_demo_model

        args.model = ensure_demo_model()
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    prompts = [
        [rng.randrange(100, vocab) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
        for _ in range(args.num_requests)
    ]
    results = {name: run_config(name, args, prompts) for name in CONFIGS}
    a, b = results["1P+1D"], results["2 colocated"]
    result = {
        "benchmark": "cluster_compare",
        "workload": {
            "num_requests": args.num_requests,
            "concurrency": args.concurrency,
            "prompt_len": [args.min_prompt, args.max_prompt],
            "output_len": args.output_len,
            "seed": args.seed,
            "model": args.model.name,
            "greedy": True,
        },
        "results": results,
        "ttft_mean_ratio_disagg_over_colocated": a["ttft_mean_s"] / b["ttft_mean_s"],
        "throughput_ratio_disagg_over_colocated": a["output_tokens_per_s"]
        / b["output_tokens_per_s"],
        "machine": describe_machine(),
        "command": "python -m bench.cluster_compare",
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
