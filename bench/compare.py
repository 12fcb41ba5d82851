"""`baton bench compare`: start each cluster configuration in turn, bench it, stop it.

Every configuration is started on this machine by the local cluster runner
(`cluster.start_cluster`), on free ports, and gets exactly the same requests on the same arrival
schedule (same seed); the results are then reported side by side. Only one cluster runs at a
time, so they do not compete for the machine.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.cluster_config import ClusterConfig
from bench.runs import RunResult
from bench.session import bench_target
from bench.settings import BenchSettings
from bench.sweep import SweepResult
from bench.target import Target
from cluster import free_port, start_cluster


@dataclass
class Comparison:
    """Per configuration (in order): its single run and, with rates, its sweep."""

    configs: list[ClusterConfig] = field(default_factory=list)
    runs: list[RunResult] = field(default_factory=list)
    sweeps: list[SweepResult] = field(default_factory=list)


def bench_config(
    config: ClusterConfig, model: Path, template: Target, settings: BenchSettings,
    rates: Sequence[float] = (),
) -> tuple[RunResult | None, SweepResult | None]:
    """Start `config`, bench it through a client like `template` (its own ports), stop it.
    The warm-up sends at least one request per worker of the configuration, all at once."""
    settings = replace(settings, warmup=max(settings.warmup, config.workers_per_role()))
    spec = config.spec(model, free_port(), free_port())
    print(f"[bench] starting {config.label} ({_workers(config)})", file=sys.stderr, flush=True)
    cluster = start_cluster(spec)
    try:
        target = replace(template, url=f"http://{spec.host}:{spec.port}",
                         grpc=f"{spec.host}:{spec.grpc_port}")
        result = asyncio.run(bench_target(target, settings, config.label, True, rates))
    finally:
        cluster.stop()
    return result.run, result.sweep


def compare(
    configs: Sequence[ClusterConfig], model: Path, template: Target, settings: BenchSettings,
    rates: Sequence[float] = (),
) -> Comparison:
    """Bench every configuration in turn with the same workload."""
    comparison = Comparison(configs=list(configs))
    for config in configs:
        run, sweep = bench_config(config, model, template, settings, rates)
        if run is not None:
            comparison.runs.append(run)
        if sweep is not None:
            comparison.sweeps.append(sweep)
    return comparison


def _workers(config: ClusterConfig) -> str:
    policy = f"policy {config.policy}" if config.policy else "the router's default policy"
    if config.colocated:
        return f"{config.colocated} colocated, {policy}"
    return f"{config.prefill} prefill + {config.decode} decode, {policy}"
