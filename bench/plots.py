"""PNG plots of benchmark results (matplotlib, headless Agg backend).

    latency_cdf.png       CDFs of TTFT, TPOT, ITL and end-to-end latency, one line per run,
                          with the SLO limits marked
    goodput_vs_rate.png   goodput and throughput against offered rate, and SLO attainment
                          against rate with the target marked, one line per sweep
    comparison.png        side-by-side bars: TTFT, TPOT and E2E percentiles, output tokens/s
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.metrics import latency_values
from bench.records import RequestRecord
from bench.slo import Slo
from bench.sweep import SweepResult

DPI = 110


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(
    runs: Sequence[tuple[str, Sequence[RequestRecord]]], slo: Slo, path: Path
) -> Path:
    """Empirical CDFs (ms) of TTFT, TPOT, ITL and E2E for each (label, records) run."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("ttft", "TTFT", slo.ttft_ms), ("tpot", "TPOT", slo.tpot_ms),
              ("itl", "inter-token latency", None), ("e2e", "end-to-end latency", None)]
    samples = [(label, latency_values(records)) for label, records in runs]
    for ax, (key, title, limit) in zip(axes.flat, panels, strict=True):
        for label, values in samples:
            ms = np.sort(np.asarray(values[key]) * 1e3)
            if ms.size:
                fraction = np.arange(ms.size + 1) / ms.size  # the step up at each sample
                ax.step(np.concatenate([ms[:1], ms]), fraction, where="post", label=label)
        if limit is not None:
            ax.axvline(limit, color="black", linestyle=":", label=f"SLO {limit:g} ms")
        what = "gaps" if key == "itl" else "requests"
        ax.set(title=title, xlabel="ms", ylabel=f"fraction of {what}", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_goodput_vs_rate(sweeps: Sequence[SweepResult], path: Path) -> Path:
    """Goodput and request throughput vs offered rate; SLO attainment (or p90 TTFT) vs rate."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    has_slo = any(p.summary.get("slo_attainment") is not None for s in sweeps for p in s.points)
    for sweep in sweeps:
        rates = [p.rate for p in sweep.points]
        line = left.plot(rates, [p.summary["request_throughput"] for p in sweep.points],
                         marker="o", linestyle="--", label=f"{sweep.label} throughput")[0]
        if has_slo:
            left.plot(rates, [p.summary["goodput"] for p in sweep.points], marker="s",
                      color=line.get_color(), label=f"{sweep.label} goodput")
            right.plot(rates, [100 * p.summary["slo_attainment"] for p in sweep.points],
                       marker="o", color=line.get_color(), label=sweep.label)
            best = sweep.max_rate()
            if best["reached_limit"] and best["interpolated_rate"] is not None:
                right.axvline(best["interpolated_rate"], color=line.get_color(), linestyle="--",
                              label=f"{sweep.label}: {best['interpolated_rate']:.2f} req/s")
        else:
            right.plot(rates, [p.summary["ttft_ms"]["p90"] for p in sweep.points], marker="o",
                       color=line.get_color(), label=sweep.label)
    left.set(title="goodput and throughput", xlabel="offered rate (req/s)", ylabel="req/s")
    if has_slo and sweeps:
        target = 100 * sweeps[0].attainment_target
        right.axhline(target, color="black", linestyle=":", label=f"target {target:g}%")
        right.set(title="SLO attainment", ylabel="% of requests", ylim=(0, 102))
    else:
        right.set(title="p90 TTFT", ylabel="ms")
    right.set(xlabel="offered rate (req/s)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_comparison(columns: Sequence[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Grouped bars per configuration: TTFT, TPOT, E2E (p50/p90/p99, ms) and output tokens/s."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    labels = [label for label, _ in columns]
    x = np.arange(len(columns))
    for ax, (metric, title) in zip(axes.flat[:3], [("ttft", "TTFT"), ("tpot", "TPOT"),
                                                   ("e2e", "end-to-end latency")], strict=True):
        for i, stat in enumerate(("p50", "p90", "p99")):
            heights = [(s.get(f"{metric}_ms") or {}).get(stat) or 0.0 for _, s in columns]
            ax.bar(x + (i - 1) * 0.27, heights, width=0.27, label=stat)
        ax.set(title=f"{title} (ms)", xticks=x, xticklabels=labels)
        ax.legend(fontsize="small")
    throughput = [s["output_throughput"] for _, s in columns]
    bars = axes.flat[3].bar(x, throughput, color="tab:green")
    axes.flat[3].bar_label(bars, fmt="%.1f")
    axes.flat[3].set(title="output tokens/s", xticks=x, xticklabels=labels)
    for ax in axes.flat:
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path
