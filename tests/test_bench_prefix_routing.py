"""The prefix-routing benchmark's oracle and its routing-decision timing (the per-policy hit
rates start clusters of five workers: run `python -m bench.prefix_routing` for those)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from bench.prefix_routing import BLOCK_SIZE, decision_latency, oracle_hit_rate


def test_oracle_counts_every_earlier_block_aligned_prefix():
    a = list(range(100, 100 + 3 * BLOCK_SIZE))
    b = a[: 2 * BLOCK_SIZE] + list(range(500, 500 + BLOCK_SIZE))
    # a: nothing cached; a again: 2 of its 3 blocks (the last token is always computed);
    # b: the 2 blocks it shares with a
    rate = oracle_hit_rate([a, a, b], "m")
    assert rate == pytest.approx((0 + 2 * BLOCK_SIZE + 2 * BLOCK_SIZE) / (3 * len(a)))


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_decision_latency_reports_the_timed_decisions():
    result = asyncio.run(decision_latency(prompt_len=64, num_prompts=8, decisions=20))
    assert result["decisions"] == 20 and result["prompt_tokens"] == 64
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert 0 < result["redis_match_p50_ms"] <= result["redis_match_p99_ms"]
