"""Same-machine A/B of Baton's engine between two source trees: Baton's parts of
`bench.gpu_engine` (batch-1 decode, 128 concurrent requests, one 8k prefill), alternating.

    python -m experiments.gpu_engine_ab --base DIR [--rounds 2] [--only decode,concurrent,prefill]
        [--out PATH.json]

`--base` is a checkout of the code to compare against (e.g. `git archive COMMIT | tar -x -C
DIR`); the other tree is this one. Every measurement runs in a fresh process whose working
directory is its tree, so each side runs its own engine and its own `bench.gpu_engine` helpers;
the sides alternate (new, base, new, base, ...) over one random model made once, so a machine's
drift weighs on both. Each side's figure is the median of its rounds' medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[1]

# Run in a tree's directory: one section's Baton timings as JSON on the last line of stdout.
CHILD = """
import json, statistics, sys
from pathlib import Path
import bench.gpu_engine as g
section, model = sys.argv[1], Path(sys.argv[2])
if section == "decode":
    runs, tokens, sync, first = g._baton_decode(model)
    out = {"tokens_per_s": g.DECODE_NEW_TOKENS / statistics.median(runs), "seconds": runs,
           "sync_seconds": sync, "first_token_seconds": first}
elif section == "concurrent":
    prompts = g.random_prompts(g.CONCURRENT_REQUESTS, g.CONCURRENT_PROMPT_TOKENS, seed=0)
    runs, tokens, sync = g._baton_concurrent(model, prompts)
    out = {"seconds": runs, "output_tokens": tokens, "sync_seconds": sync}
else:
    prompts = g.random_prompts(g.PREFILL_WARMUPS + g.PREFILL_RUNS, g.PREFILL_TOKENS, seed=2)
    out = {"seconds": g._baton_prefill(model, prompts)}
print(json.dumps(out))
"""
# What each section's figure is, and whether more is better.
FIGURES = {"decode": ("tokens_per_s", True), "concurrent": ("seconds", False),
           "prefill": ("seconds", False)}  # fmt: skip


def measure(tree: Path, section: str, model_dir: Path) -> dict[str, Any]:
    """One section's timings from a fresh process running `tree`'s code."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, section, str(model_dir)],
        cwd=tree, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{section} in {tree} failed:\n{done.stderr[-4000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def figure(result: dict[str, Any], section: str) -> float:
    """The section's one number of a run: tokens/s (decode) or median seconds."""
    name, _ = FIGURES[section]
    value = result[name]
    return float(statistics.median(value) if isinstance(value, list) else value)


def run(base: Path, sections: list[str], rounds: int) -> dict[str, Any]:
    """Every section, `rounds` times per side, alternating new and base."""
    sys.path.insert(0, str(HERE))
    from bench.gpu_engine import make_model

    sides = {"new": HERE, "base": base.resolve()}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp))
        for section in sections:
            runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
            for _ in range(rounds):
                for side, tree in sides.items():
                    runs[side].append(measure(tree, section, model_dir))
                    print(f"[ab] {section} {side}: {figure(runs[side][-1], section):.4f}",
                          file=sys.stderr, flush=True)  # fmt: skip
            medians = {s: statistics.median(figure(r, section) for r in runs[s]) for s in sides}
            name, higher_is_better = FIGURES[section]
            ratio = medians["new"] / medians["base"]
            out[section] = {
                "figure": name, "new": medians["new"], "base": medians["base"],
                "new_over_base": ratio,
                "new_no_worse_than_base": ratio >= 1 if higher_is_better else ratio <= 1,
                "runs": runs,
            }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the tree to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="decode,concurrent,prefill")
    parser.add_argument("--out", type=Path, default=Path("gpu_engine_ab.json"))
    args = parser.parse_args(argv)
    import torch

    from bench.machine import describe_machine

    result = {
        "benchmark": "gpu_engine_ab",
        "gpu": torch.cuda.get_device_name(),
        "machine": describe_machine(),
        "command": " ".join(["python -m experiments.gpu_engine_ab", *(argv or sys.argv[1:])]),
        **run(args.base, args.only.split(","), args.rounds),
    }
    text = json.dumps(result, indent=2) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    summary = {k: {f: v[f] for f in ("new", "base", "new_over_base")}
               for k, v in result.items() if isinstance(v, dict) and "new" in v}  # fmt: skip
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
