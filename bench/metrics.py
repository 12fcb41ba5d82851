"""Aggregates of one run's request records: throughput, latency percentiles, goodput.

Latencies in the summary are milliseconds (`*_ms`), throughputs per second; percentiles are
numpy's linear interpolation (as vLLM's `benchmark_serving` reports them). Latency statistics
cover successful requests only; ITL statistics pool every gap of every request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.records import RequestRecord
from bench.slo import Slo, attainment, goodput

PERCENTILES = (50, 90, 95, 99)


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, std, min, p50/p90/p95/p99 and max of `values_s` (seconds), in milliseconds."""
    keys = ["mean", "std", "min", *(f"p{p}" for p in PERCENTILES), "max"]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    stats = [ms.mean(), ms.std(), ms.min(), *np.percentile(ms, PERCENTILES), ms.max()]
    return {k: float(v) for k, v in zip(keys, stats, strict=True)}


def latency_values(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Per-metric samples in seconds: ttft, tpot, itl (pooled gaps) and e2e, successes only."""
    ok = [r for r in records if r.success]
    return {
        "ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
        "tpot": [t for r in ok if (t := r.tpot_s) is not None],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2e": [r.e2e_s for r in ok],
    }


def summarize(records: Sequence[RequestRecord], duration_s: float, slo: Slo) -> dict[str, Any]:
    """The run's aggregate numbers; goodput and attainment are None when no SLO limit is set."""
    ok = [r for r in records if r.success]
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    per_s = 1.0 / duration_s if duration_s > 0 else 0.0
    summary: dict[str, Any] = {
        "num_requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "request_throughput": len(ok) * per_s,
        "output_throughput": output_tokens * per_s,
        "total_token_throughput": (prompt_tokens + output_tokens) * per_s,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "cached_prompt_tokens": cached,
        "prompt_cache_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "goodput": goodput(records, slo, duration_s) if slo.is_set else None,
        "slo_attainment": attainment(records, slo) if slo.is_set else None,
    }
    for name, values in latency_values(records).items():
        summary[f"{name}_ms"] = distribution_ms(values)
    errors = sorted({r.error for r in records if r.error})
    summary["errors"] = errors[:5]
    return summary
