"""Benchmarking one target: connect, warm up, run once and/or sweep rates, disconnect."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.runs import RunResult, measure, warm_up
from bench.settings import BenchSettings
from bench.sweep import SweepResult, measure_sweep
from bench.target import Target


@dataclass
class TargetResult:
    """What one target gave: the single run and/or the sweep (None when not asked for)."""

    run: RunResult | None = None
    sweep: SweepResult | None = None


async def bench_target(
    target: Target,
    settings: BenchSettings,
    label: str,
    single_run: bool = True,
    rates: Sequence[float] = (),
) -> TargetResult:
    """Warm up, then one run on the settings' arrivals (if `single_run`) and a sweep over
    `rates` (if any), all through one client."""
    client = target.connect()
    result = TargetResult()
    try:
        await warm_up(client, settings)
        if single_run:
            result.run = await measure(client, settings, label)
        if rates:
            result.sweep = await measure_sweep(client, settings, rates, label)
    finally:
        await client.aclose()
    return result
