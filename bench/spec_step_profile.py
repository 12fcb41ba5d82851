"""Where a speculative step's host time goes: cProfile over one batch-1 generation with
drafts and one without (synchronous both), on an editing prompt of the demo model, the
functions with the most cumulative time printed for each.

    python -m bench.spec_step_profile --model DIR [--device cuda] [--method ngram] [--top 40]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

from bench.spec_decode import editing_prompts
from bench.spec_decode_gpu import release_gpu_memory

METHODS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
              "prompt_lookup_max": 4},
    "suffix": {"method": "suffix", "num_speculative_tokens": 5},
}  # fmt: skip


def profile(model: str, spec: dict | None, args: argparse.Namespace) -> None:
    from common.tokenizer import load_tokenizer
    from engine import LLM, SamplingParams

    prompt = editing_prompts(load_tokenizer(model), 1)
    llm = LLM(model, device=args.device, speculative_config=spec, async_scheduling=False,
              gpu_memory_utilization=0.3)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompt, params, use_tqdm=False)  # warm-up
    stats = llm.engine.core.scheduler.spec_stats
    before = stats.num_drafts
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    llm.generate(prompt, params, use_tqdm=False)
    profiler.disable()
    seconds = time.perf_counter() - start
    steps = stats.num_drafts - before
    label = "plain" if spec is None else spec["method"]
    print(f"== {label}: {args.max_tokens} tokens in {seconds * 1e3:.1f} ms, {steps} verify steps")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.top)
    del llm
    release_gpu_memory()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--method", choices=sorted(METHODS), default="ngram")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    for spec in (None, METHODS[args.method]):
        profile(str(args.model), spec, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
