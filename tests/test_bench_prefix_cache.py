"""The prefix-cache benchmark: its prompts, and one tiny end-to-end run checked field by field."""

from __future__ import annotations

import json
import statistics
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
    argv = ["--model", str(tiny_model("llama")), "--num-requests", "4"]
    argv += ["--system-prompt-tokens", "32", "--question-tokens", "4", "--output-len", "4"]
    argv += ["--max-num-batched-tokens", "36", "--out", str(out)]
    result = main(argv)

    assert json.loads(out.read_text()) == result
    assert result["benchmark"] == "prefix_cache"
    assert result["workload"]["prompt_tokens"] == 4 * 36
    assert result["workload"]["ttft_pairs"] == 2 and result["workload"]["throughput_runs"] == 2
    ttft = result["results"]["ttft"]
    assert ttft["cold_cached_tokens"] == [0, 0]  # each pair starts on a reset cache
    assert ttft["warm_cached_tokens"] == [32, 32]
    for key in ("cold_ttft_samples_s", "warm_ttft_samples_s", "cold_ttft_no_cache_samples_s"):
        assert len(ttft[key]) == 2 and min(ttft[key]) > 0
    assert ttft["cold_ttft_s"] == min(ttft["cold_ttft_samples_s"])
    assert ttft["warm_over_cold"] == min(ttft["warm_ttft_samples_s"]) / ttft["cold_ttft_s"]
    pairs = zip(ttft["warm_ttft_samples_s"], ttft["cold_ttft_samples_s"], strict=True)
    assert ttft["warm_over_cold_median_pair"] == statistics.median(w / c for w, c in pairs)
    on = result["results"]["throughput_caching_on"]
    off = result["results"]["throughput_caching_off"]
    for r in (on, off):
        assert r["output_tokens"] == 4 * 4 and r["prefix_cache_queries"] == 4 * 36
        assert r["seconds"] > 0 and r["total_tokens_per_s"] > r["output_tokens_per_s"] > 0
        assert len(r["seconds_samples"]) == 2 and r["seconds"] == min(r["seconds_samples"])
        assert "tokens" not in r
    assert on["prefix_cache_hits"] > 0 and on["prefix_cache_hits"] % 32 == 0
    assert off["prefix_cache_hits"] == 0 and off["prefix_cache_hit_rate"] == 0.0
    assert result["results"]["identical_outputs"] == "4/4"
    assert result["results"]["speedup_on_vs_off"] == off["seconds"] / on["seconds"]
    assert result["machine"]["cpu_count"] and result["command"].startswith("python -m bench.")
    assert len(result["machine"]["load_average"]) == 3
    assert len(result["machine"]["load_average_at_start"]) == 3


def test_warm_up_is_unrelated_to_the_measured_prompts(tiny_model, tmp_path: Path, monkeypatch):
    """Each engine's first generate is the warm-up: prompts of the measured length that share
    no block with the measured ones, and nothing of it is left in the cache."""
    from bench import prefix_cache

    first_calls: list[list[list[int]]] = []
    real = prefix_cache.load_engine

    def spy(model_dir, caching, args, warmup):
        first_calls.append(warmup)
        return real(model_dir, caching, args, warmup)

    monkeypatch.setattr(prefix_cache, "load_engine", spy)
    argv = ["--model", str(tiny_model("llama")), "--num-requests", "2", "--throughput-runs", "1"]
    argv += ["--system-prompt-tokens", "32", "--question-tokens", "4", "--output-len", "2"]
    argv += ["--max-num-batched-tokens", "36", "--out", str(tmp_path / "r.json")]
    result = main(argv)
    assert len(first_calls) == 2  # caching on, caching off
    prompts = make_prompts(prefix_cache.usable_token_ids(tiny_model("llama")), 2, 32, 4, seed=0)
    for warmup in first_calls:
        assert [len(w) for w in warmup] == [36, 36]
        assert all(w[:16] != p[:16] for w in warmup for p in prompts)
    assert result["results"]["ttft"]["cold_cached_tokens"] == [0]
