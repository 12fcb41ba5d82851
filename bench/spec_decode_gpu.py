"""Speculative decoding on the GPU with a model whose predictions are real: the demo model
(SmolLM2-135M-Instruct, bfloat16) with each drafter against plain decoding, in one run.

Workloads (greedy: the outputs must equal plain decoding's up to batch-shape rounding, which the
benchmark counts):

    editing   batch 1, one request after another: chats asking the model to repeat a Python
              function with its name changed (bench.spec_decode.editing_prompts)
    chat      batch 1: open questions (no copying: what a drafter that reads the model serves)
    batch16   the editing prompts 16 at once

Configurations: `off` (plain decoding, the engine's defaults: CUDA graphs, asynchronous
scheduling), `off_sync` (plain, synchronous: what speculative steps run as), ngram, suffix, and
`mlp` when --speculator names an MLP speculator (trained by `baton train-speculator`). Each
runs --repeats times after a warm-up; the fastest counts. Reported: output tokens/s, the ratio
over `off`, the mean acceptance length (tokens per verify pass), and the fraction of the
batch-1 roofline (the weights' bytes read once per step at --bandwidth) that the tokens/s reach.

    python -m bench.spec_decode_gpu --model DIR [--speculator DIR] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import describe_machine, git_commit
from bench.spec_decode import editing_prompts

CHAT_QUESTIONS = (
    "Explain how a hash table works, step by step.",
    "Write a short story about a lighthouse keeper.",
    "What are the main causes of the French Revolution?",
    "Describe the water cycle to a ten-year-old.",
    "List ten tips for writing clear technical documentation.",
    "How does a compiler turn source code into machine code?",
    "Write a recipe for a simple tomato soup.",
    "What is the difference between TCP and UDP?",
)  # fmt: skip


def configurations(speculator: Path | None) -> dict[str, tuple[dict[str, Any] | None, bool]]:
    """name -> (speculative_config, async scheduling)."""
    configs: dict[str, tuple[dict[str, Any] | None, bool]] = {
        "off": (None, True),
        "off_sync": (None, False),
        "ngram_k3": ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
                      "prompt_lookup_max": 4}, False),
        "ngram_k5": ({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
                      "prompt_lookup_max": 4}, False),
        "suffix": ({"method": "suffix", "num_speculative_tokens": 5}, False),
    }  # fmt: skip
    if speculator is not None:
        configs["mlp"] = ({"method": "mlp_speculator", "model": str(speculator)}, False)
    return configs


def chat_prompts(tokenizer: Any) -> list[list[int]]:
    out = []
    for question in CHAT_QUESTIONS:
        chat = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def timed(llm: Any, prompts: list[list[int]], params: Any, batch: int) -> tuple[float, list]:
    """Seconds and token ids of `prompts`, `batch` at a time."""
    outputs: list = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outs = llm.generate(prompts[i : i + batch], params, use_tqdm=False)
        outputs += [list(o.outputs[0].token_ids) for o in outs]
    return time.perf_counter() - start, outputs


def measure(model: str, spec: dict[str, Any] | None, on: bool, workloads, args) -> dict:
    from engine import LLM, SamplingParams

    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    llm = LLM(model, dtype=dtype, device=args.device, speculative_config=spec,
              async_scheduling=on, gpu_memory_utilization=0.3)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    first = next(iter(workloads.values()))[0]
    timed(llm, first[:2], SamplingParams(temperature=0, max_tokens=16), 1)  # warm-up
    result = {}
    for name, (prompts, batch) in workloads.items():
        stats = llm.engine.core.scheduler.spec_stats
        before = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
        best, outputs = float("inf"), []
        for _ in range(args.repeats):
            llm.engine.core.reset_prefix_cache()
            seconds, outputs = timed(llm, prompts, params, batch)
            best = min(best, seconds)
        now = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens)
        drafts, drafted, accepted = (a - b for a, b in zip(now, before, strict=True))
        tokens = sum(len(o) for o in outputs)
        result[name] = {
            "seconds": round(best, 4),
            "output_tokens": tokens,
            "tokens_per_s": round(tokens / best, 1),
            "mean_acceptance_length": round(1 + accepted / drafts, 3) if drafts else None,
            "draft_acceptance_rate": round(accepted / drafted, 3) if drafted else None,
            "outputs": outputs,
        }
    del llm
    release_gpu_memory()
    return result


def release_gpu_memory() -> None:
    """Give a deleted engine's GPU memory back, before the next engine sizes its KV cache."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def demo_record(name: str, argv: list[str] | None, dtype: str, **fields: Any) -> dict[str, Any]:
    """A result file's common head for the demo-model benchmarks: what ran, where, on what."""
    return {
        "benchmark": name,
        "command": f"python -m bench.{name} " + shlex.join(argv or sys.argv[1:]),
        "machine": describe_machine(),
        "commit": git_commit(),
        "model": "SmolLM2-135M-Instruct (demo)",
        "dtype": dtype,
        **fields,
    }


def write_results(out: Path, record: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["results"], indent=1))


def compare(results: dict[str, dict], weight_bytes: int, bandwidth: float) -> None:
    """Ratios over `off`, equality with its outputs, the roofline fraction at batch 1."""
    roofline = bandwidth / weight_bytes  # steps/s when each reads the weights once
    off = results["off"]
    for config in results.values():
        for name, row in config.items():
            reference = off[name]["outputs"]
            pairs = zip(row["outputs"], reference, strict=True)
            row["outputs_equal_off"] = sum(a == b for a, b in pairs)
            row["outputs_compared"] = len(reference)
            row["ratio_over_off"] = round(row["tokens_per_s"] / off[name]["tokens_per_s"], 3)
            if name != "batch16":
                row["fraction_of_roofline"] = round(row["tokens_per_s"] / roofline, 3)
    for config in results.values():
        for row in config.values():
            del row["outputs"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the demo model's directory")
    parser.add_argument("--speculator", type=Path, help="an MLP speculator for it")
    parser.add_argument("--out", type=Path, default=Path("bench/results/spec_decode_gpu.json"))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bandwidth", type=float, default=3.0e12, help="bytes/s (H100)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script")
    parser.add_argument("--dtype", help="default bfloat16 on cuda (float32: exact comparisons)")
    parser.add_argument("--only", nargs="+", help="configurations to run (off always runs)")
    args = parser.parse_args(argv)
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(args.model))
    editing = editing_prompts(tokenizer, 16)
    workloads = {"editing": (editing[:8], 1), "chat": (chat_prompts(tokenizer), 1),
                 "batch16": (editing, 16)}  # fmt: skip
    results: dict[str, dict] = {}
    for name, (spec, on) in configurations(args.speculator).items():
        if name == "off" or not args.only or name in args.only:
            results[name] = measure(str(args.model), spec, on, workloads, args)
            print(name, {w: r["tokens_per_s"] for w, r in results[name].items()}, flush=True)
    weight_bytes = _weight_bytes(args.model, args.dtype or "bfloat16")
    compare(results, weight_bytes, args.bandwidth)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    record = demo_record("spec_decode_gpu", argv, dtype,
                         speculator=_speculator_info(args.speculator), weight_bytes=weight_bytes,
                         max_tokens=args.max_tokens, results=results)  # fmt: skip
    write_results(args.out, record)
    return 0


def _speculator_info(path: Path | None) -> dict[str, Any] | None:
    """The MLP speculator's config and how it was trained (baton_training.json), if any."""
    if path is None:
        return None
    info = {"config": json.loads((path / "config.json").read_text())}
    training = path / "baton_training.json"
    if training.is_file():
        info["training"] = json.loads(training.read_text())
    return info


def _weight_bytes(model_dir: Path, dtype: Any) -> int:
    """Bytes of the weights read per decode step: all but the embedding table (a step reads
    one row of it), which tied embeddings read whole as the head."""
    from safetensors import safe_open

    itemsize = 2 if "16" in str(dtype) else 4
    shapes: dict[str, int] = {}
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                shapes[key] = math.prod(f.get_slice(key).get_shape())
    tied = not any(key.endswith("lm_head.weight") for key in shapes)
    total = sum(n for key, n in shapes.items() if tied or "embed_tokens" not in key)
    return total * itemsize


if __name__ == "__main__":
    raise SystemExit(main())
