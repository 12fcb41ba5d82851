"""KV transfer on two GPUs (issue 7): Baton's nccl transport against raw NCCL, and the time to
first token of 1 prefill + 1 decode worker against one colocated worker.

Bandwidth: for the KV of 2k- and 8k-token prompts of a Llama-3.2-1B shape (16 layers, 8 KV heads,
head_dim 64) and a Llama-3.1-8B shape (32 layers, 8 KV heads, head_dim 128), bf16, Baton's
`NcclKVSender.send` (control round trips, NCCL into staging, scatter into the reserved,
scattered blocks) from this process on GPU 0 to a receiver process on GPU 1
(`bench.kv_transfer_pair`, as a decode worker is), until the moment the receiver saw the blocks
land (its clock; checksums compared afterwards), against raw NCCL send/recv of the same bytes
between the same GPUs (one group of per-layer messages into contiguous buffers, no control plane,
no scatter; two threads of this process).

TTFT: `baton serve`'s cluster with the 1B-shaped random model: prefill on GPU 0 and decode on
GPU 1 (KV over NCCL; pushed after the prefill step, and again with `--layerwise-push`) against
one colocated worker on GPU 0, one request at a time, prompts of
2,048 and 8,192 random tokens (each prompt new: no prefix cache hits), streamed through the
router's OpenAI API; TTFT measured by the client.

    python -m bench.gpu_kv_transfer [--only bandwidth,ttft] [--receiver process|in-process]
                                    [--out bench/results/...json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.machine import describe_machine

SHAPES = {
    "llama-3.2-1b": {"num_layers": 16, "num_kv_heads": 8, "head_dim": 64},
    "llama-3.1-8b": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128},
}
PROMPT_TOKENS = (2048, 8192)
BLOCK_SIZE = 16
WARMUP, REPEATS = 2, 5


def _kv_bytes(shape: dict[str, int], tokens: int) -> int:
    return 2 * shape["num_layers"] * tokens * shape["num_kv_heads"] * shape["head_dim"] * 2


def raw_nccl_seconds(layers: list[torch.Tensor], dst: list[torch.Tensor]) -> float:
    """Median seconds to move `layers` (cuda:0) into `dst` (cuda:1) with grouped send/recv."""
    from cupy.cuda import nccl

    from kv_transfer.nccl import new_unique_id

    uid = new_unique_id()
    comms: list[Any] = [None, None]

    def init(rank: int) -> None:
        import cupy

        with cupy.cuda.Device(rank):
            comms[rank] = nccl.NcclCommunicator(2, uid, rank)

    threads = [threading.Thread(target=init, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    streams = [torch.cuda.Stream(torch.device("cuda", r)) for r in (0, 1)]

    def side(rank: int) -> None:
        import cupy

        with cupy.cuda.Device(rank):
            nccl.groupStart()
            for src_t, dst_t in zip(layers, dst, strict=True):
                t = src_t if rank == 0 else dst_t
                op = comms[rank].send if rank == 0 else comms[rank].recv
                op(
                    t.data_ptr(),
                    t.numel() * 2,
                    nccl.NCCL_UINT8,
                    1 - rank,
                    streams[rank].cuda_stream,
                )
            nccl.groupEnd()

    times = []
    for i in range(WARMUP + REPEATS):
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)
        start = time.perf_counter()
        threads = [threading.Thread(target=side, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        streams[0].synchronize()
        streams[1].synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    for c in comms:
        c.destroy()
    return statistics.median(times)


async def baton_seconds(src_caches: list[torch.Tensor], num_blocks: int) -> float:
    """Median seconds of `NcclKVSender.send` of `num_blocks` random blocks from GPU 0 into random
    reserved blocks of a receiver process on GPU 1, until that process reports them landed."""
    from bench.kv_transfer_pair import RemoteReceiver, time_transfers
    from kv_transfer.nccl import NcclKVSender

    _, num_cache_blocks, block_size, num_kv_heads, head_dim = src_caches[0].shape
    shape = (len(src_caches), num_cache_blocks, block_size, num_kv_heads, head_dim)
    sender = NcclKVSender(torch.device("cuda:0"))
    try:
        async with RemoteReceiver("nccl", "cuda:1", "bfloat16", shape) as receiver:
            try:
                times = await time_transfers(
                    sender, receiver, src_caches, num_blocks, REPEATS, WARMUP
                )
            finally:
                await sender.close()  # before the receiver goes: no half-open pair
    finally:
        await sender.close()
    return statistics.median(times)


async def baton_seconds_in_process(
    src_caches: list[torch.Tensor], dst_caches: list[torch.Tensor], num_blocks: int
) -> float:
    """Median seconds of `NcclKVSender.send` for `num_blocks` scattered blocks, GPU 0 -> 1, with
    the receiver in this process (`--receiver in-process`: how the first committed result was
    measured; both ends then share one event loop and one GIL)."""
    from kv_transfer import TransferSpec, gather_blocks
    from kv_transfer.nccl import NcclKVReceiver, NcclKVSender
    from prefill_service.server import CopiedLayers

    receiver = NcclKVReceiver(dst_caches)
    sender = NcclKVSender(torch.device("cuda:0"))
    await receiver.start()
    rng = random.Random(0)
    total = dst_caches[0].shape[1]
    times = []
    try:
        for i in range(WARMUP + REPEATS):
            src_ids = rng.sample(range(total), num_blocks)
            dst_ids = tuple(rng.sample(range(total), num_blocks))
            layers = gather_blocks(src_caches, src_ids)
            copied = [layers.layer(j) for j in range(layers.num_layers)]  # as the engine exports
            source = CopiedLayers(copied)
            torch.cuda.synchronize(0)
            spec = TransferSpec(f"t{i}", receiver.endpoint, dst_ids, time.time() + 60)
            future = receiver.expect(spec.transfer_id, dst_ids, spec.deadline)
            start = time.perf_counter()
            await sender.send(spec, source)
            await future
            if i >= WARMUP:
                times.append(time.perf_counter() - start)
            if i == 0:  # check it landed
                for s, d in zip(src_caches, dst_caches, strict=True):
                    assert torch.equal(s[:, src_ids].cpu(), d[:, list(dst_ids)].cpu())
    finally:
        await sender.close()
        await receiver.close()
    return statistics.median(times)


def bandwidth(receiver: str = "process") -> list[dict[str, Any]]:
    rows = []
    for name, shape in SHAPES.items():
        num_cache_blocks = 2 * max(PROMPT_TOKENS) // BLOCK_SIZE
        cache_shape = (2, num_cache_blocks, BLOCK_SIZE, shape["num_kv_heads"], shape["head_dim"])
        src = [
            torch.randn(cache_shape, device="cuda:0", dtype=torch.bfloat16)
            for _ in range(shape["num_layers"])
        ]
        for tokens in PROMPT_TOKENS:
            blocks = tokens // BLOCK_SIZE
            layer_shape = (2, blocks, BLOCK_SIZE, shape["num_kv_heads"], shape["head_dim"])
            raw_src = [c[:, :blocks].contiguous() for c in src]
            raw_dst = [torch.empty(layer_shape, device="cuda:1", dtype=torch.bfloat16)
                       for _ in src]  # fmt: skip
            raw = raw_nccl_seconds(raw_src, raw_dst)
            del raw_src, raw_dst
            if receiver == "process":
                baton = asyncio.run(baton_seconds(src, blocks))
            else:
                dst = [torch.zeros_like(c, device="cuda:1") for c in src]
                baton = asyncio.run(baton_seconds_in_process(src, dst, blocks))
                del dst
            nbytes = _kv_bytes(shape, tokens)
            row = {
                "shape": name,
                **shape,
                "prompt_tokens": tokens,
                "kv_bytes": nbytes,
                "raw_nccl_seconds": raw,
                "baton_seconds": baton,
                "raw_nccl_gib_per_s": nbytes / raw / 2**30,
                "baton_gib_per_s": nbytes / baton / 2**30,
                "baton_fraction_of_raw": raw / baton,
                "receiver": receiver,
                "aim": 0.8,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
        del src
        torch.cuda.empty_cache()
    return rows


def _ttft_run(cluster_url: str, model: str, prompts: list[list[int]]) -> list[float]:
    import httpx

    ttfts = []
    with httpx.Client(timeout=300) as client:
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True, "stream": True}  # fmt: skip
            start = time.perf_counter()
            first = None
            with client.stream("POST", f"{cluster_url}/v1/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]" and first is None:
                        first = time.perf_counter() - start
            assert first is not None, "no streamed chunk"
            ttfts.append(first)
    return ttfts


def _scrape(url: str, histogram: str) -> dict[str, float]:
    """The `_count` and `_sum` of a Prometheus histogram on a worker's /metrics page."""
    import httpx

    found: dict[str, float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        for suffix in ("_count", "_sum"):
            if line.startswith(histogram + suffix):
                found[suffix[1:]] = found.get(suffix[1:], 0.0) + float(line.rsplit(" ", 1)[1])
    if found.get("count"):
        found["mean_seconds"] = found["sum"] / found["count"]
    return found


def ttft() -> list[dict[str, Any]]:
    from bench.gpu_engine import make_model
    from launcher.serve import ClusterSpec, free_port, start_cluster

    rows: list[dict[str, Any]] = []
    pushes: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp))
        worker_args = ["--dtype", "bfloat16", "--max-num-batched-tokens", "8192",
                       "--max-model-len", "16384", "--gpu-memory-utilization", "0.6"]  # fmt: skip
        rng = random.Random(0)
        prompts = {n: [[rng.randrange(3, 30000) for _ in range(n)]
                       for _ in range(WARMUP + REPEATS)] for n in PROMPT_TOKENS}  # fmt: skip
        results: dict[str, dict[int, list[float]]] = {}
        configs = [("pd", (1, 1, 0, 2), []), ("colocated", (0, 0, 1, 1), []),
                   ("pd_layerwise", (1, 1, 0, 2), ["--layerwise-push"])]  # fmt: skip
        for label, counts, prefill_args in configs:
            prefill, decode, colocated, gpus = counts
            spec = ClusterSpec(model, prefill=prefill, decode=decode, colocated=colocated,
                               port=free_port(), grpc_port=free_port(), worker_args=worker_args,
                               prefill_args=prefill_args, num_gpus=gpus)  # fmt: skip
            cluster = start_cluster(spec)
            try:
                url = f"http://127.0.0.1:{spec.port}"
                results[label] = {}
                for n in PROMPT_TOKENS:
                    # fresh prompts every run: the prefix cache never hits
                    fresh = [[(t + 7 * k) % 30000 + 3 for t in p]
                             for k, p in enumerate(prompts[n])]  # fmt: skip
                    shift = {"pd": 0, "colocated": 11, "pd_layerwise": 23}[label]
                    fresh = [[(t + shift) % 30000 + 3 for t in p] for p in fresh]
                    results[label][n] = _ttft_run(url, model.name, fresh)[WARMUP:]
                if label == "pd":
                    worker = next(w for w in cluster.workers if w.role == "prefill")
                    pushes = _scrape(worker.metrics_url, "baton:kv_transfer_seconds")
            finally:
                cluster.stop()
        rows.append({"pd_prefill_worker_kv_pushes": pushes})  # every push of the P/D runs
        for n in PROMPT_TOKENS:
            pd, co = statistics.median(results["pd"][n]), statistics.median(results["colocated"][n])
            layerwise = statistics.median(results["pd_layerwise"][n])
            row = {
                "shape": "llama-3.2-1b",
                "prompt_tokens": n,
                "pd_ttft_s": pd,
                "colocated_ttft_s": co,
                "pd_layerwise_ttft_s": layerwise,
                "pd_ttft_samples_s": results["pd"][n],
                "colocated_ttft_samples_s": results["colocated"][n],
                "pd_layerwise_ttft_samples_s": results["pd_layerwise"][n],
                "added_fraction": pd / co - 1,
                "layerwise_added_fraction": layerwise / co - 1,
                "aim_added_at_most": 0.05,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="bandwidth,ttft")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_kv_transfer.json"))
    parser.add_argument(
        "--receiver",
        choices=["process", "in-process"],
        default="process",
        help="bandwidth: the receiver in its own process (as a decode worker) or in this one",
    )
    args = parser.parse_args(argv)
    result: dict[str, Any] = {
        "benchmark": "gpu_kv_transfer",
        "machine": describe_machine(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "command": "python -m bench.gpu_kv_transfer " + " ".join(argv or sys.argv[1:]),
    }
    sections: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "bandwidth": lambda: bandwidth(args.receiver),
        "ttft": ttft,
    }
    for section, fn in sections.items():
        if section not in args.only.split(","):
            continue
        try:
            result[section] = fn()
        except Exception as exc:  # one failing section must not lose the others' figures
            traceback.print_exc()
            result[section] = {"error": repr(exc)}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
