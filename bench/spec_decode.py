"""Speculative decoding on the CPU: the demo model with and without drafts, same run.

Workloads (greedy, so the outputs must be equal, which the benchmark checks):

    editing   batch 1: a chat asking the model to repeat a Python function with one change,
              the kind of output n-gram drafting serves (most of it copies the prompt)
    batch16   16 such requests at once (different functions): no slower than without drafts

Each configuration runs `--repeats` times after a warm-up; the fastest counts (the machine is
shared). Reports output tokens/s, the ratio against no drafts, and the mean acceptance length
(tokens per verify pass: accepted drafts + 1).

    python -m bench.spec_decode [--out bench/results/spec_decode_cpu.json] [--speculator DIR]

With `--speculator DIR` the `mlp` configuration (an MLP speculator, engine.spec_decode.
mlp_speculator) runs too, and a third workload, `chat` (plain chat questions, batch 1). The
speculator is trained once with

    baton train-speculator --model "$(baton demo-model)" --out DIR --tie-weights \
        --stage1-steps 30 --stage2-steps 70 --batch-size 4 --seq-len 64 --stage2-prompts 48 \
        --lr 2e-3 --threads 2
"""

from __future__ import annotations

import argparse
import inspect
import json
import shlex
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from bench.machine import describe_machine, git_commit, load_average

METHODS: dict[str, dict[str, Any] | None] = {
    "off": None,
    "ngram_k3": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2,
                 "prompt_lookup_max": 4},
    "ngram_k5": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
                 "prompt_lookup_max": 4},
    "suffix": {"method": "suffix", "num_speculative_tokens": 5},
}  # fmt: skip
# Standard-library modules whose functions the editing prompts quote (present on any Python)
SOURCE_MODULES = ("textwrap", "shlex", "json.decoder", "string", "fnmatch", "glob", "base64",
                  "calendar", "difflib")  # fmt: skip
AIMS = {"editing_ngram_over_off": 1.5, "batch16_ngram_over_off": 1.0,  # at least
        "editing_mlp_over_off": 1.3, "editing_mlp_acceptance_length": 1.5,
        "batch16_mlp_over_off": 1.0}  # fmt: skip
CHAT_QUESTIONS = ("What is a Python decorator? Answer in three sentences.",
                  "Explain what a hash table is to a new programmer.",
                  "Give me three tips for writing clear emails.",
                  "Why is the sky blue?")  # fmt: skip


def chat_prompts(tokenizer: Any) -> list[list[int]]:
    """Plain chat questions, the chat template applied."""
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                          add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for q in CHAT_QUESTIONS
    ]  # fmt: skip


def editing_prompts(tokenizer: Any, num: int) -> list[list[int]]:
    """Chats asking to repeat a standard-library function with its name changed."""
    import importlib

    modules = [importlib.import_module(m) for m in SOURCE_MODULES]
    sources = [
        inspect.getsource(f)
        for module in modules
        for _, f in inspect.getmembers(module, inspect.isfunction)
        if f.__module__ == module.__name__ and 300 < len(inspect.getsource(f)) < 1500
    ]
    prompts = []
    for source in sources[:num]:
        body = textwrap.dedent(source)
        chat = [{"role": "user", "content": "Rewrite this Python function, renaming it to "
                 f"`renamed`, and change nothing else:\n\n```python\n{body}```"}]  # fmt: skip
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer.encode(text, add_special_tokens=False))
    assert len(prompts) == num, f"found {len(prompts)} functions, wanted {num}"
    return prompts


def run(model: str, spec: dict[str, Any] | None, prompts, max_tokens: int, repeats: int):
    from engine import LLM, SamplingParams

    llm = LLM(model, dtype="float32", num_kv_blocks=2048, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    best, outputs = float("inf"), None
    for _ in range(repeats):
        llm.engine.core.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
        outputs = [o.outputs[0].token_ids for o in outs]
    assert outputs is not None
    stats = llm.engine.core.scheduler.spec_stats
    tokens = sum(len(o) for o in outputs)
    return {
        "seconds": round(best, 3),
        "output_tokens": tokens,
        "tokens_per_s": round(tokens / best, 2),
        "mean_acceptance_length": round(stats.mean_acceptance_length, 3),
        "draft_acceptance_rate": round(stats.num_accepted_tokens / stats.num_draft_tokens, 3)
        if stats.num_draft_tokens
        else None,
    }, outputs


def workload(model: str, prompts, max_tokens: int, repeats: int,
             methods: dict[str, dict[str, Any] | None]) -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {}
    reference = None
    for name, spec in methods.items():
        results[name], outputs = run(model, spec, prompts, max_tokens, repeats)
        if reference is None:
            reference = outputs
        results[name]["outputs_equal_off"] = outputs == reference
        if name != "off":
            off = results["off"]["tokens_per_s"]
            results[name]["ratio_over_off"] = round(results[name]["tokens_per_s"] / off, 3)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/spec_decode_cpu.json"))
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--speculator", type=Path, default=None, metavar="DIR",
                        help="an MLP speculator for the demo model (baton train-speculator)")
    args = parser.parse_args(argv)
    methods = dict(METHODS)
    if args.speculator is not None:
        methods["mlp"] = {"method": "mlp_speculator", "model": str(args.speculator)}
    from common.tokenizer import load_tokenizer
    from engine.models.demo import ensure_demo_model

    model = str(ensure_demo_model(progress=False))
    tokenizer = load_tokenizer(model)
    prompts = editing_prompts(tokenizer, 16)
    result: dict[str, Any] = {
        "benchmark": "spec_decode",
        "command": "python -m bench.spec_decode " + shlex.join(argv or sys.argv[1:]),
        "git_commit": git_commit(),
        "machine": describe_machine(),
        "load_average_before": load_average(),
        "model": "SmolLM2-135M-Instruct (demo), float32, CPU",
        "methods": methods,
        "max_tokens": args.max_tokens,
        "editing": workload(model, prompts[:1], args.max_tokens, args.repeats, methods),
        "batch16": workload(model, prompts, args.max_tokens, args.repeats, methods),
        "aims": AIMS,
        "load_average_after": load_average(),
    }
    if args.speculator is not None:  # batch 1, one question after another
        chat = {"off": None, "mlp": methods["mlp"]}
        result["chat"] = [workload(model, [p], args.max_tokens, args.repeats, chat)
                          for p in chat_prompts(tokenizer)]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("editing", "batch16"):
        for method, row in result[name].items():
            print(name, method, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
