"""Prefix caching: time to first token warm against cold, and throughput with caching on and off.

Workload (the prefix-caching issue): 16 requests on the demo model, each a shared system prompt
of exactly 1,024 tokens followed by a distinct 24-token question (token ids drawn from the
vocabulary without special tokens, seeded; no two questions start with the same token, so a
warm request can reuse exactly the system prompt's 64 blocks). Two engines, loaded up front:
prefix caching on, and off; each gets one short warm-up generate, then its cache is reset.

1. TTFT (caching on, fresh cache): request 0 alone is the cold one; requests 1..K, one at a time,
   are warm (K = num_requests - 1, or --warm-samples). TTFT = first_token_time - arrival_time, in
   seconds, with max_tokens=1. Aim: warm mean TTFT at most a fifth of cold. Request 0 on the
   caching-off engine gives a second cold sample.
2. Throughput: all requests in one `generate` call, --output-len tokens each (greedy, eos
   ignored), on each engine (the caching-on one after a cache reset). Reports seconds, output and
   total (prompt + output) tokens per second, the prefix cache hit rate (tokens, this phase only),
   the speedup on/off, and whether greedy outputs match between the two engines. A request
   admitted in the same step as request 0 misses the cache (request 0's blocks are indexed only
   once computed): with the default 2,048-token step budget, requests 0 and 1 both miss.

The KV cache is sized to hold every request at once without sharing, so neither engine preempts.
Float32 on CPU threads. Writes a JSON result and prints it.

    python -m bench.prefix_cache [--out bench/results/prefix_cache_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import describe_machine
from engine import LLM, SamplingParams
from engine.kv_cache.manager import cdiv
from engine.outputs import RequestOutput

BLOCK_SIZE = 16  # tokens per KV block (the engine's default)
AIM_WARM_OVER_COLD = 0.2  # the target: warm TTFT <= cold / 5


def make_prompts(
    token_pool: list[int], num: int, system_tokens: int, question_tokens: int, seed: int
) -> list[list[int]]:
    """`num` prompts: one shared `system_tokens`-long prefix plus a distinct question each.

    Questions start with pairwise different tokens, so prompts share exactly the prefix.
    """
    if num > len(token_pool):
        raise ValueError(f"num_requests={num} exceeds the {len(token_pool)} usable token ids")
    rng = random.Random(seed)
    system = [rng.choice(token_pool) for _ in range(system_tokens)]
    firsts = rng.sample(token_pool, num)
    return [
        system + [first] + [rng.choice(token_pool) for _ in range(question_tokens - 1)]
        for first in firsts
    ]


def usable_token_ids(model_dir: Path) -> list[int]:
    """Token ids of the model's vocabulary, without the tokenizer's special tokens."""
    from engine.models.loader import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    special = set(tokenizer.all_special_ids)
    return [t for t in range(min(vocab, len(tokenizer))) if t not in special]


def ttft_s(output: RequestOutput) -> float:
    """Seconds from a request's arrival to its first token."""
    assert output.metrics is not None and output.metrics.first_token_time is not None
    return output.metrics.first_token_time - output.metrics.arrival_time


def load_engine(model_dir: Path, caching: bool, args: argparse.Namespace, warmup: list[int]) -> LLM:
    """An engine whose KV cache holds every request in full; warmed up, cache reset."""
    per_request = cdiv(
        args.system_prompt_tokens + args.question_tokens + args.output_len, BLOCK_SIZE
    )
    llm = LLM(
        str(model_dir),
        block_size=BLOCK_SIZE,
        num_kv_blocks=args.num_requests * per_request,
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=caching,
    )
    llm.generate([warmup], SamplingParams(max_tokens=2), use_tqdm=False)
    llm.reset_prefix_cache()
    return llm


def measure_ttft(
    llm: LLM, no_cache: LLM, prompts: list[list[int]], warm_samples: int
) -> dict[str, Any]:
    """Cold TTFT of prompts[0] on a fresh cache, then warm TTFTs of the next ones, one by one."""
    first_token = SamplingParams(temperature=0, max_tokens=1)
    assert llm.reset_prefix_cache(), "requests still hold blocks"
    cold = llm.generate([prompts[0]], first_token, use_tqdm=False)[0]
    warm = [
        llm.generate([p], first_token, use_tqdm=False)[0] for p in prompts[1 : 1 + warm_samples]
    ]
    cold_no_cache = no_cache.generate([prompts[0]], first_token, use_tqdm=False)[0]
    warm_s = [ttft_s(o) for o in warm]
    mean = statistics.mean(warm_s)
    return {
        "cold_ttft_s": ttft_s(cold),
        "cold_ttft_no_cache_s": ttft_s(cold_no_cache),
        "warm_samples": len(warm_s),
        "warm_ttft_mean_s": mean,
        "warm_ttft_p50_s": statistics.median(warm_s),
        "warm_ttft_max_s": max(warm_s),
        "warm_ttft_s": warm_s,
        "warm_over_cold": mean / ttft_s(cold),
        "meets_aim": mean <= AIM_WARM_OVER_COLD * ttft_s(cold),
        "cold_cached_tokens": cold.num_cached_tokens,
        "warm_cached_tokens": [o.num_cached_tokens for o in warm],
    }


def measure_throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """All prompts in one `generate` call; prefix cache hits are counted for this call only."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    assert llm.reset_prefix_cache(), "requests still hold blocks"
    stats = llm.engine.core.prefix_cache_stats
    queries, hits = stats.queries, stats.hits
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    queries, hits = stats.queries - queries, stats.hits - hits
    llm.check_integrity()
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(p) for p in prompts)
    return {
        "seconds": elapsed,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / elapsed,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / elapsed,
        "mean_ttft_s": statistics.mean(ttft_s(o) for o in outputs),
        "prefix_cache_queries": queries,  # prompt tokens looked up at admission
        "prefix_cache_hits": hits,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "tokens": [o.outputs[0].token_ids for o in outputs],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: demo model)")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--system-prompt-tokens", type=int, default=1024)
    parser.add_argument("--question-tokens", type=int, default=24)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument(
        "--warm-samples", type=int, default=None, help="warm TTFT samples (default: all but one)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix_cache_cpu.json"))
    args = parser.parse_args(argv)
    if args.num_requests < 2:
        parser.error("--num-requests must be at least 2 (one cold, one warm)")
    if args.question_tokens < 1 or args.system_prompt_tokens < 1:
        parser.error("--question-tokens and --system-prompt-tokens must be at least 1")
    cap = args.num_requests - 1
    args.warm_samples = cap if args.warm_samples is None else min(args.warm_samples, cap)
    if args.warm_samples < 1:
        parser.error("--warm-samples must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.model is None:
        from engine.models.demo import ensure_demo_model

        args.model = ensure_demo_model()
    pool = usable_token_ids(args.model)
    prompts = make_prompts(
        pool, args.num_requests, args.system_prompt_tokens, args.question_tokens, args.seed
    )
    warmup = random.Random(args.seed + 1).choices(pool, k=32)  # shares no prefix with prompts
    cached = load_engine(args.model, True, args, warmup)
    uncached = load_engine(args.model, False, args, warmup)
    ttft = measure_ttft(cached, uncached, prompts, args.warm_samples)
    on = measure_throughput(cached, prompts, args.output_len)
    off = measure_throughput(uncached, prompts, args.output_len)
    same = sum(a == b for a, b in zip(on.pop("tokens"), off.pop("tokens"), strict=True))
    result = {
        "benchmark": "prefix_cache",
        "workload": {
            "num_requests": args.num_requests,
            "system_prompt_tokens": args.system_prompt_tokens,
            "question_tokens": args.question_tokens,
            "prompt_tokens": sum(len(p) for p in prompts),
            "output_len": args.output_len,
            "warm_samples": args.warm_samples,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "block_size": BLOCK_SIZE,
            "seed": args.seed,
            "model": args.model.name,
            "dtype": str(cached.engine.config.model.dtype).removeprefix("torch."),
            "greedy": True,
        },
        "results": {
            "ttft": ttft,
            "throughput_caching_on": on,
            "throughput_caching_off": off,
            "speedup_on_vs_off": off["seconds"] / on["seconds"],
            # greedy outputs equal with and without prefix caching
            "identical_outputs": f"{same}/{len(prompts)}",
        },
        "machine": describe_machine(),
        "command": shlex.join(
            ["python", "-m", "bench.prefix_cache", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
