"""KV transfer on two GPUs (issue 7): Baton's nccl transport against raw NCCL, and the time to
first token of 1 prefill + 1 decode worker against one colocated worker; and the same on one GPU,
where the two workers share it and move KV over CUDA IPC.

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

One GPU (`--only bandwidth_one_gpu,ttft_one_gpu`, the default on a one-GPU machine): the same
KV from this process into a receiver process on the same GPU with `CudaIpcKVSender.send` (control
round trips over TCP, then the block-copy kernel writing straight into the receiver's mapped
cache), against a device-to-device copy of the same bytes in one process (per layer, contiguous
buffers, no control plane); TTFT of prefill + decode on that one GPU (KV over CUDA IPC; and over
TCP through the host, the previous default there) against one colocated worker, each worker with
the same share of the GPU's memory.

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
from typing import Any, NamedTuple, cast

import torch

from bench.machine import describe_machine, git_commit

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


async def baton_seconds(
    src_caches: list[torch.Tensor], num_blocks: int, transport: str = "nccl"
) -> float:
    """Median seconds of a `send` of `num_blocks` random blocks from GPU 0 into random reserved
    blocks of a receiver process, until that process reports them landed: over `nccl` into GPU
    1, or over `cuda-ipc` into GPU 0 itself."""
    from bench.kv_transfer_pair import RemoteReceiver, time_transfers
    from kv_transfer.dispatch import gpu_sender

    _, num_cache_blocks, block_size, num_kv_heads, head_dim = src_caches[0].shape
    shape = (len(src_caches), num_cache_blocks, block_size, num_kv_heads, head_dim)
    sender = gpu_sender(transport, torch.device("cuda:0"))
    device = "cuda:1" if transport == "nccl" else "cuda:0"
    try:
        async with RemoteReceiver(transport, device, "bfloat16", shape) as receiver:
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


def _bandwidth_rows(
    measure: Callable[[list[torch.Tensor], int], tuple[float, float]],
    baseline: str,
    **fields: Any,
) -> list[dict[str, Any]]:
    """For each shape and prompt length, `measure(src caches on GPU 0, blocks)` -> (seconds of
    the raw `baseline`, seconds of Baton's transfer), as rows."""
    rows = []
    for name, shape in SHAPES.items():
        num_cache_blocks = 2 * max(PROMPT_TOKENS) // BLOCK_SIZE
        cache_shape = (2, num_cache_blocks, BLOCK_SIZE, shape["num_kv_heads"], shape["head_dim"])
        src = [
            torch.randn(cache_shape, device="cuda:0", dtype=torch.bfloat16)
            for _ in range(shape["num_layers"])
        ]
        for tokens in PROMPT_TOKENS:
            raw, baton = measure(src, tokens // BLOCK_SIZE)
            nbytes = _kv_bytes(shape, tokens)
            row = {
                "shape": name,
                **shape,
                "prompt_tokens": tokens,
                "kv_bytes": nbytes,
                f"raw_{baseline}_seconds": raw,
                "baton_seconds": baton,
                f"raw_{baseline}_gib_per_s": nbytes / raw / 2**30,
                "baton_gib_per_s": nbytes / baton / 2**30,
                "baton_fraction_of_raw": raw / baton,
                **fields,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
        del src
        torch.cuda.empty_cache()
    return rows


def bandwidth(receiver: str = "process") -> list[dict[str, Any]]:
    """Two GPUs: the nccl transport against raw NCCL send/recv."""

    def measure(src: list[torch.Tensor], blocks: int) -> tuple[float, float]:
        raw_src = [c[:, :blocks].contiguous() for c in src]
        raw_dst = [torch.empty_like(t, device="cuda:1") for t in raw_src]
        raw = raw_nccl_seconds(raw_src, raw_dst)
        del raw_src, raw_dst
        if receiver == "process":
            return raw, asyncio.run(baton_seconds(src, blocks))
        dst = [torch.zeros_like(c, device="cuda:1") for c in src]
        return raw, asyncio.run(baton_seconds_in_process(src, dst, blocks))

    return _bandwidth_rows(measure, "nccl", receiver=receiver, aim=0.8)


def raw_copy_seconds(layers: list[torch.Tensor]) -> float:
    """Median wall seconds to copy `layers` into same-shaped buffers on their GPU, per layer."""
    dst = [torch.empty_like(t) for t in layers]
    times = []
    for i in range(WARMUP + REPEATS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for d, t in zip(dst, layers, strict=True):
            d.copy_(t)
        torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bandwidth_one_gpu() -> list[dict[str, Any]]:
    """One GPU: the cuda-ipc transport into another process against a copy in one."""

    def measure(src: list[torch.Tensor], blocks: int) -> tuple[float, float]:
        raw = raw_copy_seconds([c[:, :blocks].contiguous() for c in src])
        return raw, asyncio.run(baton_seconds(src, blocks, "cuda-ipc"))

    return _bandwidth_rows(measure, "copy", transport="cuda-ipc")


def _ttft_run(
    cluster_url: str, model: str, prompts: list[list[int]]
) -> list[tuple[float, float]]:
    """Per prompt, seconds to the first and to the second streamed token (the second waits
    for the KV to land in the decode worker: with P/D, the push is not in the first's time)."""
    import httpx

    times = []
    with httpx.Client(timeout=300) as client:
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                    "ignore_eos": True, "stream": True}  # fmt: skip
            start = time.perf_counter()
            chunks: list[float] = []
            with client.stream("POST", f"{cluster_url}/v1/completions", json=body) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks.append(time.perf_counter() - start)
            assert len(chunks) >= 2, "fewer than two streamed chunks"
            times.append((chunks[0], chunks[1]))
    return times


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


# (label, ClusterSpec fields): the TTFT section's clusters; "colocated" is the baseline
TTFT_TWO_GPUS: list[tuple[str, dict[str, Any]]] = [
    ("pd", {"prefill": 1, "decode": 1, "num_gpus": 2}),
    ("colocated", {"prefill": 0, "decode": 0, "colocated": 1, "num_gpus": 1}),
    ("pd_layerwise", {"prefill": 1, "decode": 1, "num_gpus": 2,
                      "prefill_args": ["--layerwise-push"]}),
]  # fmt: skip
TTFT_ONE_GPU: list[tuple[str, dict[str, Any]]] = [
    ("pd", {"prefill": 1, "decode": 1, "num_gpus": 1}),  # cuda-ipc, by placement
    ("colocated", {"prefill": 0, "decode": 0, "colocated": 1, "num_gpus": 1}),
    ("pd_layerwise", {"prefill": 1, "decode": 1, "num_gpus": 1,
                      "prefill_args": ["--layerwise-push"]}),
    ("pd_tcp", {"prefill": 1, "decode": 1, "num_gpus": 1, "kv_transport": "tcp"}),
]  # fmt: skip


def ttft(
    configs: list[tuple[str, dict[str, Any]]] = TTFT_TWO_GPUS,
    memory_fraction: float = 0.6,
    only: str = "",
) -> list[dict[str, Any]]:
    """Each config's median TTFT per prompt length against the colocated config's (and the
    second token's time). `memory_fraction`: every worker's --gpu-memory-utilization; `only`:
    the labels to run, comma-separated (colocated always runs)."""
    if only:
        configs = [c for c in configs if c[0] in {"colocated", *only.split(",")}]
    from bench.gpu_engine import make_model

    runs: dict[str, _TTFTRun] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp))
        worker_args = ["--dtype", "bfloat16", "--max-num-batched-tokens", "8192",
                       "--max-model-len", "16384",
                       "--gpu-memory-utilization", str(memory_fraction)]  # fmt: skip
        rng = random.Random(0)
        prompts = {n: [[rng.randrange(3, 30000) for _ in range(n)]
                       for _ in range(WARMUP + REPEATS)] for n in PROMPT_TOKENS}  # fmt: skip
        for shift, (label, fields) in enumerate(configs):
            runs[label] = _ttft_config(model, fields, worker_args, prompts, shift)
    # every push of the P/D runs (warm-up requests and the first Triton launches included)
    pushes = {label: run.pushes for label, run in runs.items() if run.pushes is not None}
    transports = {label: run.transport for label, run in runs.items() if run.transport}
    rows: list[dict[str, Any]] = [{"prefill_worker_kv_pushes": pushes, "kv_transports": transports}]
    for n in PROMPT_TOKENS:
        rows.append(_ttft_row(runs, n))
        print(json.dumps(rows[-1]), flush=True)
    return rows


class _TTFTRun(NamedTuple):
    """One config's samples per prompt length (first and second token, seconds), its decode
    workers' KV transport and its prefill worker's push histogram (None without one)."""

    first: dict[int, list[float]]
    second: dict[int, list[float]]
    transport: str
    pushes: dict[str, float] | None


def _ttft_config(
    model: Path, fields: dict[str, Any], worker_args: list[str],
    prompts: dict[int, list[list[int]]], shift: int,
) -> _TTFTRun:  # fmt: skip
    """Start one config's cluster, time its requests (fresh prompts: no prefix-cache hit),
    stop it."""
    from cluster import ClusterSpec, free_port, start_cluster

    spec = ClusterSpec(model, port=free_port(), grpc_port=free_port(),
                       worker_args=worker_args, **fields)  # fmt: skip
    cluster = start_cluster(spec)
    first: dict[int, list[float]] = {}
    second: dict[int, list[float]] = {}
    try:
        transport, pushes = "", None
        for worker in cluster.workers:
            if worker.role == "decode":
                args = [str(a) for a in cast(list[str], worker.proc.args)]
                flag = "--kv-transport"
                transport = args[args.index(flag) + 1] if flag in args else "tcp"
        url = f"http://127.0.0.1:{spec.port}"
        for n in PROMPT_TOKENS:
            fresh = [[(t + 7 * k + 11 * shift) % 30000 + 3 for t in p]
                     for k, p in enumerate(prompts[n])]  # fmt: skip
            timed = _ttft_run(url, model.name, fresh)[WARMUP:]
            first[n] = [f for f, _ in timed]
            second[n] = [s for _, s in timed]
        for worker in cluster.workers:
            if worker.role == "prefill":
                pushes = _scrape(worker.metrics_url, "baton:kv_transfer_seconds")
    finally:
        cluster.stop()
    return _TTFTRun(first, second, transport, pushes)


def _ttft_row(runs: dict[str, _TTFTRun], n: int) -> dict[str, Any]:
    """The medians for prompts of `n` tokens, each config against the colocated one."""
    co = statistics.median(runs["colocated"].first[n])
    row: dict[str, Any] = {
        "shape": "llama-3.2-1b",
        "prompt_tokens": n,
        "colocated_ttft_s": co,
        "colocated_ttft_samples_s": runs["colocated"].first[n],
    }
    for label, run in runs.items():
        if label != "colocated":
            median = statistics.median(run.first[n])
            row[f"{label}_ttft_s"] = median
            row[f"{label}_ttft_samples_s"] = run.first[n]
            row[f"{label}_added_fraction"] = median / co - 1
        row[f"{label}_second_token_s"] = statistics.median(run.second[n])
    row["aim_added_at_most"] = 0.05
    return row


def main(argv: list[str] | None = None) -> None:
    global REPEATS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default="",
        help="sections, comma-separated (default: bandwidth,ttft on two or more GPUs, else"
        " bandwidth_one_gpu,ttft_one_gpu)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_kv_transfer.json"))
    parser.add_argument(
        "--receiver",
        choices=["process", "in-process"],
        default="process",
        help="bandwidth: the receiver in its own process (as a decode worker) or in this one",
    )
    parser.add_argument("--configs", default="", help="TTFT: the P/D configs to run (pd,...)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed runs per figure")
    args = parser.parse_args(argv)
    REPEATS = args.repeats
    result: dict[str, Any] = {
        "benchmark": "gpu_kv_transfer",
        "machine": describe_machine(),
        "code": git_commit(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "command": "python -m bench.gpu_kv_transfer " + " ".join(argv or sys.argv[1:]),
    }
    sections: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "bandwidth": lambda: bandwidth(args.receiver),
        "ttft": lambda: ttft(only=args.configs),
        "bandwidth_one_gpu": bandwidth_one_gpu,
        "ttft_one_gpu": lambda: ttft(TTFT_ONE_GPU, memory_fraction=0.3, only=args.configs),
    }
    only = args.only or (
        "bandwidth,ttft" if torch.cuda.device_count() >= 2 else "bandwidth_one_gpu,ttft_one_gpu"
    )
    for section, fn in sections.items():
        if section not in only.split(","):
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
