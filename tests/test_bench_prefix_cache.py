"""The prefix-cache benchmark: its prompts, and one tiny end-to-end run checked field by field."""

from __future__ import annotations

import json
from pathlib import Path

from bench.prefix_cache import main, make_prompts


def test_prompts_share_exactly_the_system_prompt() -> None:
    prompts = make_prompts(list(range(3, 512)), 8, system_tokens=32, question_tokens=5, seed=0)
    assert all(len(p) == 37 for p in prompts)
    assert len({tuple(p[:32]) for p in prompts}) == 1
    assert len({p[32] for p in prompts}) == 8  # questions diverge at their first token
    assert prompts == make_prompts(list(range(3, 512)), 8, 32, 5, seed=0)


def test_tiny_run_reports_ttft_throughput_and_cache_hits(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "prefix_cache.json"
    # A 36-token step budget puts request 0's prefill alone in the first step, so the others
    # are admitted after its blocks are cached.
    argv = ["--model", str(tiny_model("llama")), "--num-requests", "3"]
    argv += ["--system-prompt-tokens", "32", "--question-tokens", "4", "--output-len", "4"]
    argv += ["--max-num-batched-tokens", "36", "--out", str(out)]
    result = main(argv)

    assert json.loads(out.read_text()) == result
    assert result["benchmark"] == "prefix_cache"
    assert result["workload"]["prompt_tokens"] == 3 * 36
    assert result["workload"]["warm_samples"] == 2
    ttft = result["results"]["ttft"]
    assert ttft["cold_cached_tokens"] == 0
    assert ttft["warm_cached_tokens"] == [32, 32]
    assert len(ttft["warm_ttft_s"]) == 2 and ttft["cold_ttft_s"] > 0
    assert ttft["warm_over_cold"] == ttft["warm_ttft_mean_s"] / ttft["cold_ttft_s"]
    on = result["results"]["throughput_caching_on"]
    off = result["results"]["throughput_caching_off"]
    for r in (on, off):
        assert r["output_tokens"] == 3 * 4 and r["prefix_cache_queries"] == 3 * 36
        assert r["seconds"] > 0 and r["total_tokens_per_s"] > r["output_tokens_per_s"] > 0
        assert "tokens" not in r
    assert on["prefix_cache_hits"] > 0 and on["prefix_cache_hits"] % 32 == 0
    assert off["prefix_cache_hits"] == 0 and off["prefix_cache_hit_rate"] == 0.0
    assert result["results"]["identical_outputs"] == "3/3"
    assert result["results"]["speedup_on_vs_off"] > 0
    assert result["machine"]["cpu_count"] and result["command"].startswith("python -m bench.")
