"""Prefix-aware routing: cluster prefix hit rate per policy against an oracle, and the routing
decision's latency with the Redis index.

1. Hit rate: for each policy (round_robin, least_loaded, prefix_aware) a fresh cluster of 4
   prefill workers and 1 decode worker on the tiny model serves the same multi-tenant
   shared-prefix workload (`bench.shared_prefix`: K system prompts, Zipf popularity, distinct
   questions) at a fixed concurrency. Hit rate = cached prompt tokens (as the prefill workers
   report them in `usage`) / prompt tokens. The oracle replays the trace into one infinite
   cache: each request hits the longest block-aligned prefix (at most prompt - 1 tokens) that
   any earlier request computed.
   Before the workload, each cluster serves one warm-up request per prefill worker, sent at
   once so that every policy spreads them, on prompts that share no block with the workload's:
   no worker pays its first request's one-time costs inside the measured run, where a slower
   first answer would change which requests overlap and so which ones find a prefix cached.
2. Decision latency: a Redis index holding 4 workers' blocks for 32 prompts of 8,192 tokens;
   one decision = hash the prompt, one Redis match, the policy's choice. p50/p99 in ms, after
   one untimed decision per prompt (the first connection, the first hashing).
Conditional disaggregation is off here, so every prompt is prefilled on a prefill worker.

    python -m bench.prefix_routing [--out bench/results/prefix_routing_cpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import httpx

from bench.local_redis import RedisServer
from bench.machine import describe_machine, git_commit, load_average
from bench.shared_prefix import SharedPrefix
from cluster import ClusterSpec, free_port, start_cluster
from engine.kv_cache.hashing import hash_prompt_blocks, request_extra_keys

POLICIES = ("round_robin", "least_loaded", "prefix_aware")
BLOCK_SIZE = 16
PREFILL_WORKERS = 4


def oracle_hit_rate(prompts: list[list[int]], model: str) -> float:
    """Cached / prompt tokens if every request found every earlier computed prefix."""
    seen: set[int] = set()
    hits = total = 0
    extra = request_extra_keys(model, None)
    for prompt in prompts:
        hashes = hash_prompt_blocks(prompt, BLOCK_SIZE, extra)
        usable = (len(prompt) - 1) // BLOCK_SIZE
        leading = 0
        while leading < usable and hashes[leading] in seen:
            leading += 1
        hits += leading * BLOCK_SIZE
        total += len(prompt)
        seen.update(hashes)
    return hits / total


async def _send_all(base: str, model: str, prompts, max_tokens, concurrency: int) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(prompt: list[int], out: int) -> int:
            body = {"model": model, "prompt": prompt, "max_tokens": out, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            async with sem:
                response = await client.post(f"{base}/v1/completions", json=body)
            response.raise_for_status()
            return int(response.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

        return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, max_tokens, strict=True)))


def measure_policy(
    policy: str, model_dir: Path, workload, concurrency: int, warmup: list[list[int]]
) -> dict[str, Any]:
    """Hit rate of `workload` on a fresh 4 + 1 cluster routed by `policy`, after `warmup`
    (prompts unrelated to the workload's) was served, all at once."""
    # No conditional disaggregation: the one decode worker holds every prefix, and prefilling
    # there would hide how well the policy spreads prompts over the prefill workers.
    spec = ClusterSpec(model_dir, prefill=PREFILL_WORKERS, decode=1, port=free_port(),
                       grpc_port=free_port(), policy=policy,
                       router_args=["--local-prefill-threshold", "0"])  # fmt: skip
    cluster = start_cluster(spec)
    try:
        base = f"http://127.0.0.1:{spec.port}"
        asyncio.run(_send_all(base, model_dir.name, warmup, [2] * len(warmup), len(warmup)))
        prompts = [r.prompt for r in workload]
        start = time.perf_counter()
        cached = asyncio.run(
            _send_all(base, model_dir.name, prompts, [r.max_tokens for r in workload], concurrency)
        )
        seconds = time.perf_counter() - start
    finally:
        cluster.stop()
    prompt_tokens = sum(len(p) for p in prompts)
    return {"hit_rate": sum(cached) / prompt_tokens, "cached_tokens": sum(cached),
            "prompt_tokens": prompt_tokens, "seconds": seconds}  # fmt: skip


async def decision_latency(prompt_len: int, num_prompts: int, decisions: int) -> dict[str, float]:
    """ms per routing decision (hash + Redis match + choose) on a populated Redis index."""
    from prefix_index.redis_store import RedisIndexWriter, RedisPrefixIndex, connect, namespace
    from proto.baton.v1 import kv_events_pb2
    from router.policies import PrefixAwarePolicy, RequestContext
    from router.workers import Role, WorkerInfo

    server = RedisServer()
    try:
        ns, extra = namespace("bench", "m"), request_extra_keys("m", None)
        rng = random.Random(0)
        prompts = [
            [rng.randrange(100, 50000) for _ in range(prompt_len)] for _ in range(num_prompts)
        ]
        writer, index = (
            RedisIndexWriter(connect(server.url), ns),
            RedisPrefixIndex(connect(server.url), ns),
        )
        workers = [WorkerInfo.connect(f"127.0.0.1:{9000 + w}", Role.PREFILL) for w in range(4)]
        for w, worker in enumerate(workers):
            mine = [h for p in prompts[w::4] for h in hash_prompt_blocks(p, BLOCK_SIZE, extra)]
            batch = kv_events_pb2.KVEventBatch(worker_id=worker.address, epoch="e", snapshot=True,
                                               ttl_seconds=600, snapshot_hashes=mine)  # fmt: skip
            await writer.apply(batch)
        policy, totals, matches = PrefixAwarePolicy(), [], []
        for i in range(-num_prompts, decisions):  # the first num_prompts are not timed
            prompt = prompts[i % num_prompts]
            start = time.perf_counter()
            ctx = RequestContext.build(str(i), prompt, extra, BLOCK_SIZE)
            before_match = time.perf_counter()
            ctx.prefix_matches = await index.match(ctx.block_hashes)
            after_match = time.perf_counter()
            chosen = policy.choose(workers, ctx)
            if i >= 0:
                totals.append(time.perf_counter() - start)
                matches.append(after_match - before_match)
            assert chosen is workers[i % num_prompts % 4]  # the holder wins
        await writer.close()
        await index.close()
    finally:
        server.stop()
    return {"p50_ms": _pct(totals, 50), "p99_ms": _pct(totals, 99),
            "redis_match_p50_ms": _pct(matches, 50), "redis_match_p99_ms": _pct(matches, 99),
            "mean_ms": statistics.fmean(totals) * 1000, "decisions": decisions,
            "prompt_tokens": prompt_len}  # fmt: skip


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] * 1000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="default: a tiny qwen2 model")
    parser.add_argument("--num-requests", type=int, default=96)
    parser.add_argument("--num-prefixes", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=256)
    parser.add_argument("--question-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--decisions", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix_routing_cpu.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_at_start = load_average()
    if args.model is None:
        from engine.models.tiny import make_tiny_model

        args.model = make_tiny_model(Path("/tmp/baton-bench-tiny-qwen2"), "qwen2", 0)
    vocab = json.loads((args.model / "config.json").read_text())["vocab_size"]
    shape = SharedPrefix(args.num_prefixes, args.prefix_len, args.question_len, args.output_len)
    workload = shape.generate(args.num_requests, args.seed, vocab)
    oracle = oracle_hit_rate([cast(list[int], r.prompt) for r in workload], args.model.name)
    # another seed's prompts of the workload's length: no block in common with the workload
    rng = random.Random(args.seed + 1000)
    length = args.prefix_len + args.question_len
    warmup = [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(PREFILL_WORKERS)]
    policies = {
        p: measure_policy(p, args.model, workload, args.concurrency, warmup) for p in POLICIES
    }
    for result in policies.values():
        result["fraction_of_oracle"] = result["hit_rate"] / oracle
    latency = asyncio.run(decision_latency(8192, 32, args.decisions))
    result = {
        "benchmark": "prefix_routing",
        "workload": {
            "kind": "shared-prefix multi-tenant",
            "num_requests": args.num_requests,
            "num_prefixes": args.num_prefixes,
            "prefix_len": args.prefix_len,
            "question_len": args.question_len,
            "output_len": args.output_len,
            "zipf_s": 1.0,
            "concurrency": args.concurrency,
            "seed": args.seed,
            "cluster": "4 prefill + 1 decode, tiny qwen2",
            "warmup": "4 unrelated prompts at once per cluster; 32 untimed decisions",
        },  # fmt: skip
        "oracle_hit_rate": oracle,
        "policies": policies,
        "decision_latency_redis_8192_tokens": latency,
        "machine": {**describe_machine(), "load_average_at_start": load_at_start},
        "code": git_commit(),
        "command": shlex.join(
            ["python", "-m", "bench.prefix_routing", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot_hit_rates(result, args.out.with_suffix(".png"))
    return result


def plot_hit_rates(result: dict[str, Any], path: Path) -> None:
    """Bar chart: each policy's cluster prefix hit rate, with the oracle bound as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["policies"])
    rates = [result["policies"][n]["hit_rate"] for n in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(names, rates, color=["#999999", "#6688cc", "#33aa66"][: len(names)])
    ax.axhline(result["oracle_hit_rate"], color="black", linestyle="--", label="oracle bound")
    for bar, rate in zip(bars, rates, strict=True):
        fraction = rate / result["oracle_hit_rate"]
        ax.annotate(f"{rate:.2f} ({fraction:.0%} of oracle)", (bar.get_x() + bar.get_width() / 2,
                    rate), ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax.set_ylabel("cached prompt tokens / prompt tokens")
    ax.set_title("Cluster prefix hit rate, 4 prefill workers, shared-prefix workload")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
