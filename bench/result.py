"""The result of a benchmark: one JSON document plus its PNG plots, written into one directory.

    OUT/result.json        everything needed to judge and rerun it: mode, command, seed,
                           machine, target or cluster configurations, workload, arrivals, SLO,
                           every run's summary and per-request records, sweeps, plot names
    OUT/latency_cdf.png    (runs; a lone sweep's rates)     OUT/goodput_vs_rate.png  (sweeps)
    OUT/comparison.png     (compare)
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.machine import describe_machine, git_commit
from bench.plots import plot_comparison, plot_goodput_vs_rate, plot_latency_cdfs
from bench.runs import RunResult
from bench.settings import BenchSettings
from bench.sweep import SweepResult

RESULT_FILE = "result.json"
SCHEMA_VERSION = 1


def base_result(mode: str, settings: BenchSettings, command: str) -> dict[str, Any]:
    """The fields every result has, before its runs: mode, command, seed, machine, load."""
    return {
        "benchmark": "baton bench",
        "schema_version": SCHEMA_VERSION,
        "mode": mode,
        "command": command,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "seed": settings.seed,
        "git_commit": git_commit(),
        "machine": describe_machine(),
        **settings.describe(),
    }


def write_result(
    result: dict[str, Any],
    out_dir: Path,
    runs: Sequence[RunResult],
    sweeps: Sequence[SweepResult],
    settings: BenchSettings,
) -> Path:
    """Add the runs, sweeps and plots to `result`, write it all into `out_dir`; the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result["runs"] = [r.to_json() for r in runs]
    result["sweeps"] = [s.to_json() for s in sweeps]
    plots: list[Path] = []
    pairs = [(r.label, r.records) for r in runs]
    if not pairs and len(sweeps) == 1:  # a sweep alone: one CDF line per rate
        pairs = [(f"{p.rate:g} req/s", p.records) for p in sweeps[0].points]
    if pairs:
        plots.append(plot_latency_cdfs(pairs, settings.slo, out_dir / "latency_cdf.png"))
    if sweeps:
        plots.append(plot_goodput_vs_rate(sweeps, out_dir / "goodput_vs_rate.png"))
    if len(runs) > 1 and result["mode"] == "compare":
        columns = [(r.label, r.summary) for r in runs]
        plots.append(plot_comparison(columns, out_dir / "comparison.png"))
    result["plots"] = [p.name for p in plots]
    path = out_dir / RESULT_FILE
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path
