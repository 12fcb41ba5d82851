"""Where a decode step's GPU time goes: the kernels of the captured decode graphs.

The engine of `bench.gpu_engine` (a random-weight model with Llama-3.2-1B's shape, bfloat16)
decodes 128 requests of 512-token prompts (compiling every kernel); then one decode step of 1
and of 128 sequences of 576 tokens each (`stage_step`) is run through the graphs and that
graph is replayed under `torch.profiler`, each kernel's time per replay summed by kind (GEMM,
attention, norm, ...). The replay's wall time, from CUDA events, is the step's GPU time without
the host.

A batch-1 generate under the profiler gives the step's period on the GPU timeline, from one
graph's first kernel to the next's, and how long the GPU idled in it (the host's copies and
launches between replays).

The host's time per decode step of 128 sequences (`host_step`: a tiny model on the same GPU,
so the step's wall time is the host's), against the 1B graph's replay at batch 128: above 1,
the concurrent benchmark's decode phase waits for the host on this machine.

The same 128-request run (bench.gpu_engine's concurrent benchmark: 512-token prompts, 128 new
tokens) is then split into its phases: the wall time of the prompts alone (one new token each)
against the whole run, and the kernel time of the whole run by kind and by kernel (their sum
against the wall time: how long the GPU idled).

    python -m experiments.gpu_decode_profile [--out PATH.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from bench.gpu_engine import (
    SHAPE,
    baton_llm,
    make_model,
    random_prompts,
    weight_bytes,
    write_result,
)
from bench.machine import describe_machine

BATCHES = (1, 128)
CONTEXT = 512 + 64  # tokens of context per sequence in the profiled decode steps
REPLAYS = 20
# Kernel kinds by name, first match wins (cuBLAS's Hopper GEMMs are named nvjet_*).
KINDS = (
    ("gemm", ("nvjet", "gemm", "cutlass", "splitKreduce", "_gemv_")),
    ("attention", ("_decode_split_kernel", "_decode_reduce_kernel", "_prefill")),
    ("norm", ("_rms_norm_kernel",)),
    ("rotary", ("_rotary_kernel",)),
    ("kv_write", ("_write_kv_kernel",)),
    ("activation", ("_silu_mul_kernel",)),
    ("argmax", ("ArgMax", "MaxOps", "gather", "_slice_max_kernel", "_pick_slice_kernel")),
)


def kind_of(kernel: str) -> str:
    for kind, marks in KINDS:
        if any(mark in kernel for mark in marks):
            return kind
    return "other"


def stage_step(graphs: Any, batch: int, context: int) -> None:
    """Run one decode step of `batch` sequences of `context` tokens (blocks of their own, past
    block 0) through the graphs, so that the staged inputs a replay of that size unpacks
    are a real step's: each size reads the staged block in its own layout, and the last step
    the engine ran may have been another size's."""
    per_seq = -(-context // graphs.block_size)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
    graphs.run([context - 1] * batch, tables, [5] * batch)
    torch.cuda.synchronize()


def profile_graph(graph: torch.cuda.CUDAGraph) -> dict[str, Any]:
    """Kernel time per replay by kind and by kernel, and the replay's wall time."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    launches = 0
    for event in prof.events():
        if event.device_type.name == "CUDA":
            per_kernel[event.name] += event.device_time / REPLAYS / 1000  # ms per replay
            launches += 1
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        by_kind[kind_of(name)] += ms
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    end.synchronize()
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]
    return {
        "replay_ms": start.elapsed_time(end) / 50,
        "kernel_ms": sum(per_kernel.values()),
        "kernels_per_replay": launches // REPLAYS,
        "ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": {name[:100]: ms for name, ms in top},
    }


def profile_batch(graphs: Any, batch: int, context: int) -> dict[str, Any]:
    stage_step(graphs, batch, context)
    return profile_graph(graphs._graphs[batch])


STEP_MARK = "_stage_inputs_kernel"  # every decode graph's first kernel


def step_timeline(events: list[tuple[str, float, float]]) -> dict[str, Any]:
    """Decode steps on the GPU timeline, from (name, start_us, end_us) device events sorted by
    start: each step runs from one `STEP_MARK` kernel to the next. Per step, the GPU is busy
    for the union of its events' intervals (kernels may overlap under PDL) and idle for the
    rest; `between` counts the events by name outside the graph, after its last kernel's end
    (copies, host-launched ops), in the median step."""
    marks = [i for i, (name, _, _) in enumerate(events) if STEP_MARK in name]
    steps = []
    for a, b in itertools.pairwise(marks):
        period = events[b][1] - events[a][1]
        busy, reach = 0.0, events[a][1]
        for _, start, end in events[a:b]:
            start = max(start, reach)
            if end > start:
                busy += end - start
                reach = end
        steps.append((period, period - busy, a, b))
    if not steps:
        return {"steps": 0}
    steps.sort()
    period, idle, a, b = steps[len(steps) // 2]
    return {
        "steps": len(steps),
        "period_us_median": period,
        "idle_us_in_median_step": idle,
        "ops_in_median_step": b - a,
    }


def batch1_steps(llm: Any, new_tokens: int = 64) -> dict[str, Any]:
    """`step_timeline` of a batch-1 generate (16-token prompt) under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu_engine import DECODE_PROMPT
    from engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate([DECODE_PROMPT], params, use_tqdm=False)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([DECODE_PROMPT], params, use_tqdm=False)
        torch.cuda.synchronize()
    events = [
        (e.name, e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type.name == "CUDA"
    ]
    events.sort(key=lambda e: e[1])
    return step_timeline(events)


def concurrent_phases(llm: Any) -> dict[str, Any]:
    """Wall seconds of 128 prompts alone and of the whole 128-token run; kernel ms by kind of
    the whole run (under the profiler, another run)."""
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu_engine import CONCURRENT_NEW_TOKENS, CONCURRENT_PROMPT_TOKENS, timed
    from engine import SamplingParams

    def run(seed: int, new_tokens: int) -> float:
        prompts = random_prompts(128, CONCURRENT_PROMPT_TOKENS, seed=seed)
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        return timed(lambda: llm.generate(prompts, params, use_tqdm=False))[0]

    prompts_s = [run(40 + i, 1) for i in range(3)]
    whole_s = [run(50 + i, CONCURRENT_NEW_TOKENS) for i in range(3)]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(60, CONCURRENT_NEW_TOKENS)
        torch.cuda.synchronize()
    by_kind: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type.name == "CUDA":
            by_kind[kind_of(event.name)] += event.device_time / 1000
            per_kernel[event.name[:100]] += event.device_time / 1000
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:16]
    return {
        "prompts_only_seconds": sorted(prompts_s)[1],
        "whole_run_seconds": sorted(whole_s)[1],
        "kernel_ms": sum(per_kernel.values()),
        "kernel_ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": dict(top),
    }


def host_step(requests: int = 128, new_tokens: int = 128, device: str = "cuda") -> dict[str, Any]:
    """The engine's host time per decode step of `requests` sequences: a tiny random model
    (`baton make-tiny-model`'s llama) on the same GPU, whose steps take the GPU a small
    fraction of the host's time, so a step's wall time is the host's (scheduling, inputs,
    outputs and detokenization). Against the 1B graph's replay at the same batch, it says
    whether the concurrent benchmark's decode phase is GPU- or host-bound on this machine."""
    import time

    from engine import LLM, SamplingParams
    from engine.models.tiny import make_tiny_model

    llm = LLM(
        str(make_tiny_model(Path(tempfile.mkdtemp()), "llama")),
        device=device,
        max_num_seqs=requests,
        max_num_batched_tokens=8192,
        kv_cache_memory_bytes=1 << 30,
    )

    def run(seed: int, tokens: int) -> float:
        rng = random.Random(seed)  # the tiny model's vocabulary is 512 ids
        prompts = [[rng.randrange(3, 500) for _ in range(16)] for _ in range(requests)]
        params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)  # returns once the last token is read
        return time.perf_counter() - start

    run(0, 8)
    first = sorted(run(70 + i, 1) for i in range(3))[1]
    whole = sorted(run(80 + i, new_tokens) for i in range(3))[1]
    return {
        "requests": requests,
        "prompt_tokens": 16,
        "new_tokens": new_tokens,
        "first_token_seconds": first,
        "whole_seconds": whole,
        "ms_per_decode_step": (whole - first) / (new_tokens - 1) * 1000,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu_decode_profile.json"))
    args = parser.parse_args(argv)
    from engine import SamplingParams

    model_dir = make_model(Path(tempfile.mkdtemp()))
    llm = baton_llm(
        model_dir, max_num_seqs=128, max_num_batched_tokens=8192, kv_cache_memory_bytes=8 << 30
    )
    prompts = random_prompts(128, 512, seed=5)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    graphs = llm.engine.core.runner.graphs
    assert graphs is not None, "the decode graphs need the Triton backend on a GPU"
    result: dict[str, Any] = {
        "benchmark": "gpu_decode_profile",
        "model": {"shape": SHAPE, "dtype": "bfloat16", "weight_bytes": weight_bytes(model_dir)},
        "context_tokens": CONTEXT,
        "batches": {str(b): profile_batch(graphs, b, CONTEXT) for b in BATCHES},
        "batch1_steps": batch1_steps(llm),
        "concurrent": concurrent_phases(llm),
        "host_step": host_step(),
        "machine": describe_machine(),
        "command": " ".join(["python -m experiments.gpu_decode_profile", *(argv or sys.argv[1:])]),
    }
    host = result["host_step"]
    host["over_1b_graph_replay"] = (
        host["ms_per_decode_step"] / result["batches"]["128"]["replay_ms"]
    )
    write_result(result, args.out)
    print(json.dumps({b: r["ms_by_kind"] for b, r in result["batches"].items()}, indent=1))


if __name__ == "__main__":
    main()
