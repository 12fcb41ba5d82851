"""A request-rate sweep: goodput against rate, and the highest rate that keeps SLO attainment.

Each rate runs the workload once, with arrivals of the settings' kind (Poisson with its
burstiness, or bursts of its size) at that rate. Point i uses seed + i, so a later point's
prompts are not prefix-cache hits left over from an earlier one; compared configurations still
get identical requests at each rate.

The highest rate at attainment (DistServe): with points sorted by rate, the last rate before
attainment first drops below the target is the highest tested rate that keeps it; the rate
where the line between that point and the next crosses the target is the interpolated one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.arrivals import ArrivalProcess, Bursts, Poisson
from bench.client import BenchClient
from bench.runs import RunResult, measure
from bench.settings import BenchSettings


@dataclass
class SweepResult:
    """A sweep's points (one run per rate, ascending) and the attainment target."""

    label: str
    points: list[RunResult] = field(default_factory=list)
    attainment_target: float = 0.9

    def max_rate(self) -> dict[str, Any]:
        pairs = [(p.rate or 0.0, p.summary.get("slo_attainment")) for p in self.points]
        known = [(r, a) for r, a in pairs if a is not None]
        return max_rate_at_attainment(known, self.attainment_target)

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "points": [p.to_json() for p in self.points],
            "max_rate_at_attainment": self.max_rate(),
        }


def max_rate_at_attainment(
    points: Sequence[tuple[float, float]], target: float
) -> dict[str, Any]:
    """From (rate req/s, attainment fraction) pairs: the highest tested rate that keeps
    attainment >= target (None if the lowest already misses), and the interpolated crossing.

    `reached_limit` is False when every tested rate kept the target (the true limit is higher).
    """
    ordered = sorted(points)
    result: dict[str, Any] = {"target": target, "highest_tested_rate": None,
                              "interpolated_rate": None, "reached_limit": bool(ordered)}
    for i, (rate, att) in enumerate(ordered):
        if att >= target:
            continue
        if i > 0:
            r0, a0 = ordered[i - 1]
            result["highest_tested_rate"] = r0
            result["interpolated_rate"] = r0 + (a0 - target) / (a0 - att) * (rate - r0)
        return result
    if ordered:
        result.update(highest_tested_rate=ordered[-1][0], interpolated_rate=ordered[-1][0],
                      reached_limit=False)
    return result


def arrivals_at(template: ArrivalProcess, rate: float) -> ArrivalProcess:
    """`template`'s kind of process at `rate` req/s (Poisson unless it is bursts)."""
    if isinstance(template, Bursts):
        return Bursts(rate, template.size)
    burstiness = template.burstiness if isinstance(template, Poisson) else 1.0
    return Poisson(rate, burstiness)


async def measure_sweep(
    client: BenchClient, settings: BenchSettings, rates: Sequence[float], label: str
) -> SweepResult:
    """Run the workload at each rate (ascending); point i with seed + i."""
    sweep = SweepResult(label, attainment_target=settings.slo.attainment_target)
    for i, rate in enumerate(sorted(rates)):
        arrivals = arrivals_at(settings.arrivals, rate)
        point = await measure(
            client, settings, f"{label} @ {rate:g}/s", arrivals, settings.seed + i, rate
        )
        sweep.points.append(point)
    return sweep
