"""Command-line arguments that build a worker's engine."""

from __future__ import annotations

import argparse

import torch

from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from engine.core import EngineCore


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The engine flags every worker takes (names follow vLLM's)."""
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument(
        "--kv-cache-memory-bytes",
        type=int,
        default=None,
        help="default: 1 GiB on CPU, --gpu-memory-utilization on a GPU",
    )
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-kv-blocks", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--max-num-waiting", type=int, default=None)
    parser.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "fair"])
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--enforce-eager", action="store_true", help="GPU: no CUDA graphs for decode batches"
    )
    parser.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch a greedy decode step before reading the previous one's tokens "
        "(default: on with CUDA graphs)",
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core)",
    )
    parser.add_argument("--seed", type=int, default=0)


def add_index_args(parser: argparse.ArgumentParser) -> None:
    """Where the worker publishes its KV events (the prefix index); neither flag: nowhere."""
    parser.add_argument("--index-redis-url", default=None, help="redis:// or rediss:// URL")
    parser.add_argument(
        "--index-router",
        nargs="*",
        default=None,
        metavar="ADDR",
        help="routers' gRPC addresses (their in-process index)",
    )
    parser.add_argument("--cluster-name", default="default", help="Redis key namespace part")
    parser.add_argument("--worker-id", default=None, help="default: HOST:PORT of this worker")


def publishes_kv_events(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "index_redis_url", None) or getattr(args, "index_router", None))


def build_engine_core(args: argparse.Namespace) -> EngineCore:
    """An EngineCore from parsed `add_engine_args` flags (KV events on: the index reads them)."""
    torch.manual_seed(args.seed)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    config = EngineConfig(
        model=ModelConfig.from_pretrained(
            args.model, args.dtype, args.max_model_len, args.served_model_name
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization,
            num_blocks=args.num_kv_blocks,
            enable_prefix_caching=not args.no_prefix_caching,
            enable_kv_events=publishes_kv_events(args),
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            policy=args.scheduling_policy,
            max_num_waiting=args.max_num_waiting,
        ),
        device=torch.device(args.device),
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling,
    )
    return EngineCore(config)
