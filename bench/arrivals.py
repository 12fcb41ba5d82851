"""Arrival processes: when each request (or each session's first turn) is released, in seconds.

    AllAtOnce()              every request at t = 0; with a concurrency limit this is a closed
                             loop of `concurrency` clients (a fixed-concurrency benchmark)
    Poisson(rate, b)         gaps ~ Gamma(shape=b, scale=1/(rate*b)): mean 1/rate seconds;
                             b = 1 is a Poisson process, b < 1 burstier, b > 1 more regular
                             (vLLM's --burstiness)
    Bursts(rate, size)       `size` requests at once, bursts a Poisson process of rate/size per
                             second, so the mean request rate is still `rate`
    TraceTimes()             the trace's own timestamps

A concurrency limit (the runner's) caps requests in flight on top of any of these. The first
release is at t = 0; offsets are nondecreasing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np

from bench.workload import BenchRequest

ARRIVAL_STREAM = 3  # tag of the arrivals' random stream, apart from the workload's


class ArrivalProcess(Protocol):
    """Release offsets (seconds from the start) for a sequence of requests."""

    def offsets(self, requests: Sequence[BenchRequest], seed: int) -> list[float]:
        """One nondecreasing offset per request, the first 0 (TraceTimes: the trace's)."""
        ...

    def describe(self) -> dict[str, Any]:
        """The process and its parameters, JSON-ready."""
        ...


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng((seed, 0, ARRIVAL_STREAM))


def _from_gaps(gaps: np.ndarray) -> list[float]:
    return [0.0, *np.cumsum(gaps).tolist()]


@dataclass(slots=True)
class AllAtOnce:
    """Everything released at t = 0."""

    kind: str = "all_at_once"

    def offsets(self, requests: Sequence[BenchRequest], seed: int) -> list[float]:
        return [0.0] * len(requests)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Poisson:
    """`rate` requests per second, gamma-distributed gaps of shape `burstiness`."""

    rate: float
    burstiness: float = 1.0
    kind: str = "poisson"

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)) or self.burstiness <= 0:
            raise ValueError(f"need 0 < rate < inf and burstiness > 0: {self.rate}, "
                             f"{self.burstiness}")

    def offsets(self, requests: Sequence[BenchRequest], seed: int) -> list[float]:
        if not requests:
            return []
        scale = 1.0 / (self.rate * self.burstiness)
        gaps = _rng(seed).gamma(self.burstiness, scale, size=len(requests) - 1)
        return _from_gaps(gaps)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Bursts:
    """Bursts of `size` requests; bursts arrive as a Poisson process of `rate / size` per s."""

    rate: float
    size: int
    kind: str = "bursts"

    def __post_init__(self) -> None:
        if not (self.rate > 0 and math.isfinite(self.rate)) or self.size < 1:
            raise ValueError(f"need 0 < rate < inf and size >= 1: {self.rate}, {self.size}")

    def offsets(self, requests: Sequence[BenchRequest], seed: int) -> list[float]:
        num_bursts = math.ceil(len(requests) / self.size)
        if num_bursts == 0:
            return []
        gaps = _rng(seed).exponential(self.size / self.rate, size=num_bursts - 1)
        starts = _from_gaps(gaps)
        return [starts[i // self.size] for i in range(len(requests))]

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class TraceTimes:
    """The requests' own `arrival_s` (a trace's timestamps); missing ones count as 0."""

    kind: str = "trace"

    def offsets(self, requests: Sequence[BenchRequest], seed: int) -> list[float]:
        return [r.arrival_s or 0.0 for r in requests]

    def describe(self) -> dict[str, Any]:
        return asdict(self)
