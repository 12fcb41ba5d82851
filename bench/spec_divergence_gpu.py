"""Why greedy outputs with drafts can differ from plain decoding's on the GPU: the logprobs at
the first token where they part.

A verify step scores k + 1 rows per sequence with other kernels (and reduction orders) than a
one-row decode step, so the same position's logits round differently. If that is the only
cause, every divergence sits at a near tie: the drafting run took one of plain decoding's
next choices (its runner-up, or the drafting run ranks plain's choice second), and plain
decoding's margin between its top two is within what rounding moves: the drift the two runs
show on positions where they still agree, or TIE_NATS of the dtype (two steps of a bfloat16
logit between 16 and 32, where the spacing is 0.125). This run checks that, on the demo
model, for ngram and suffix drafting against plain (synchronous) decoding:

    python -m bench.spec_divergence_gpu --model DIR [--dtype float32] [--out PATH]

For each sequence that differs it records the first differing position, both runs' top three
(token, logprob), and the drift before it (largest and median |logprob difference| of the
chosen tokens); `explained_by_near_tie` counts the divergences at a near tie as defined above.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from bench.spec_decode import editing_prompts
from bench.spec_decode_gpu import chat_prompts, demo_record, release_gpu_memory, write_results

CONFIGS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "ngram_k5": {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 2,
                 "prompt_lookup_max": 4},
    "suffix": {"method": "suffix", "num_speculative_tokens": 5},
}  # fmt: skip
TIE_NATS = {"bfloat16": 0.25, "float16": 0.25, "float32": 0.02}  # what rounding can flip


def generate(model: str, spec: dict[str, Any] | None, prompts: list[list[int]], args) -> list:
    """(token ids, per position [(token, logprob) by rank]) of each prompt, one at a time."""
    from engine import LLM, SamplingParams

    llm = LLM(model, dtype=args.dtype, device=args.device, speculative_config=spec,
              async_scheduling=False, gpu_memory_utilization=0.3)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=3)
    runs = []
    for prompt in prompts:
        out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        ranked = [
            sorted(((t, lp.logprob) for t, lp in row.items()), key=lambda x: -x[1])
            for row in out.logprobs
        ]
        runs.append((list(out.token_ids), ranked))
    llm.check_integrity()
    del llm
    release_gpu_memory()
    return runs


def divergence(plain: tuple, drafted: tuple, tie: float) -> dict[str, Any] | None:
    """The first position where `drafted`'s tokens leave `plain`'s, with both runs' top
    choices there and the drift before it; None when they agree throughout."""
    (ids_a, ranked_a), (ids_b, ranked_b) = plain, drafted
    at = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y), None)
    if at is None:
        return None
    drift = [
        abs(dict(ranked_a[i])[tok] - dict(ranked_b[i])[tok]) for i, tok in enumerate(ids_a[:at])
    ]
    found = {
        "position": at,
        "plain_top": ranked_a[at][:3],
        "drafted_top": ranked_b[at][:3],
        "plain_margin": round(ranked_a[at][0][1] - ranked_a[at][1][1], 5),
        "drafted_choice_is_plain_runner_up": ids_b[at] == ranked_a[at][1][0],
        "drift_before_max": round(max(drift, default=0.0), 5),
        "drift_before_median": round(statistics.median(drift), 5) if drift else 0.0,
    }
    found["near_tie"] = near_tie(found, tie)
    return found


def near_tie(found: dict[str, Any], tie: float) -> bool:
    """Whether a divergence (`divergence`'s record) is one rounding explains: the drafting run
    took plain's runner-up or ranks plain's choice second, and plain's margin is within the
    drift before it or `tie`."""
    plain_choice = found["plain_top"][0][0]
    swapped = found["drafted_choice_is_plain_runner_up"] or (
        len(found["drafted_top"]) > 1 and found["drafted_top"][1][0] == plain_choice
    )
    return swapped and found["plain_margin"] <= max(found["drift_before_max"], tie)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the demo model's directory")
    parser.add_argument("--out", type=Path, default=Path("bench/results/spec_divergence_gpu.json"))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script")
    args = parser.parse_args(argv)
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(args.model))
    prompts = editing_prompts(tokenizer, 8) + chat_prompts(tokenizer)
    runs = {name: generate(str(args.model), spec, prompts, args) for name, spec in CONFIGS.items()}
    results: dict[str, Any] = {}
    for name in CONFIGS:
        if name == "plain":
            continue
        tie = TIE_NATS.get(args.dtype, 0.0)
        found = [divergence(a, b, tie) for a, b in zip(runs["plain"], runs[name], strict=True)]
        parted = [d for d in found if d is not None]
        results[name] = {
            "sequences": len(found),
            "identical": len(found) - len(parted),
            "diverged": len(parted),
            "explained_by_near_tie": sum(d["near_tie"] for d in parted),
            "tie_nats": tie,
            "divergences": parted,
        }
        print(name, {k: v for k, v in results[name].items() if k != "divergences"}, flush=True)
    record = demo_record("spec_divergence_gpu", argv, args.dtype, max_tokens=args.max_tokens,
                         results=results)  # fmt: skip
    write_results(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
