"""The cost of a speculative verify step on the GPU, against a plain decode step, same run.

A random-weight model with Llama-3.2-1B's shape (bf16, bench.gpu_engine), CUDA graphs on. A
drafter that always proposes exactly k tokens (whatever they are: a verify pass costs the same
accepted or not) makes every decode step verify k drafts, k = 1..5; the plain baseline decodes
the same requests without drafts, both synchronously and with asynchronous scheduling (the
engine's default). Reported per batch size: milliseconds per step and the verify/plain ratio.
A verify step of k drafts that costs r plain steps pays off once a step yields more than r
tokens on average (mean acceptance length).

    python -m bench.spec_verify_gpu [--batch 1,8,32] [--out PATH.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.gpu_engine import make_model
from bench.machine import describe_machine, git_commit

STEPS = 128  # decode steps timed per configuration
PROMPT = 64


class FixedDrafts:
    """A proposer that always drafts k tokens (the request's last token repeated)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def propose(self, requests: Sequence[Any], max_drafts: Sequence[int]) -> list[list[int]]:
        return [
            [r.all_token_ids[-1]] * min(self.k, m)
            for r, m in zip(requests, max_drafts, strict=True)
        ]


def step_ms(llm: Any, batch: int, k: int | None) -> dict[str, float]:
    """Milliseconds per engine step decoding `batch` requests (k drafts each, or none)."""
    from engine import SamplingParams

    core = llm.engine.core
    if k is not None:
        core.proposer = FixedDrafts(k)
    prompts = [[3 + (i * 7 + j) % 20000 for j in range(PROMPT)] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)  # warm
    steps_before = core.scheduler.num_steps
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    steps = core.scheduler.num_steps - steps_before
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"ms_per_step": round(1000 * seconds / steps, 4), "steps": steps,
            "tokens_per_step": round(tokens / steps / batch, 3)}  # fmt: skip


def _freed() -> None:
    """After the caller dropped its engine: give its GPU memory back."""
    gc.collect()
    torch.cuda.empty_cache()


def measure(model_dir: Path, batches: list[int]) -> dict[str, Any]:
    from engine import LLM

    spec = {"method": "ngram", "num_speculative_tokens": 5}
    out: dict[str, Any] = {}
    for batch in batches:
        row: dict[str, Any] = {}
        for name, kwargs in (("plain_async", {}), ("plain_sync", {"async_scheduling": False})):
            llm = LLM(str(model_dir), device="cuda", max_num_seqs=max(batches),
                      gpu_memory_utilization=0.4, **kwargs)  # fmt: skip
            row[name] = step_ms(llm, batch, None)
            llm = None
            _freed()
        llm = LLM(str(model_dir), device="cuda", max_num_seqs=max(batches),
                  gpu_memory_utilization=0.4, speculative_config=spec)  # fmt: skip
        for k in range(1, 6):
            row[f"verify_k{k}"] = step_ms(llm, batch, k)
            row[f"verify_k{k}"]["ratio_to_plain_sync"] = round(
                row[f"verify_k{k}"]["ms_per_step"] / row["plain_sync"]["ms_per_step"], 3
            )
        row["graph_replays"] = llm.engine.core.runner.graphs.replays
        llm = None
        _freed()
        out[f"batch_{batch}"] = row
        print(batch, json.dumps(row), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--out", type=Path, default=Path("bench/results/spec_verify_gpu.json"))
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp))
        results = measure(model_dir, batches)
    result = {
        "benchmark": "spec_verify_gpu",
        "command": "python -m bench.spec_verify_gpu " + " ".join(argv or sys.argv[1:]),
        "git_commit": git_commit(),
        "machine": describe_machine(),
        "device": torch.cuda.get_device_name(),
        "model": "random weights, Llama-3.2-1B shape, bf16; CUDA graphs on",
        "steps": STEPS,
        "prompt_tokens": PROMPT,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
