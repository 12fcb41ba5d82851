"""Arrival processes: Poisson and gamma gaps, bursts, all at once, trace timestamps."""

from __future__ import annotations

import numpy as np
import pytest

from bench.arrivals import AllAtOnce, Bursts, Poisson, TraceTimes
from bench.sweep import arrivals_at
from bench.workload import BenchRequest


def _requests(n: int) -> list[BenchRequest]:
    return [BenchRequest(i, [100], 1) for i in range(n)]


def test_poisson_gaps_are_exponential_with_mean_one_over_rate() -> None:
    offsets = Poisson(rate=4.0).offsets(_requests(8000), seed=0)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 0.25) < 0.01
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: coefficient of variation 1


def test_burstiness_keeps_the_rate_and_changes_the_spread() -> None:
    for burstiness in (0.25, 4.0):
        gaps = np.diff(Poisson(rate=2.0, burstiness=burstiness).offsets(_requests(8000), 1))
        assert abs(gaps.mean() - 0.5) < 0.03
        assert abs(gaps.std() / gaps.mean() - burstiness**-0.5) < 0.1  # gamma: CV = 1/sqrt(b)


def test_arrivals_are_deterministic_per_seed() -> None:
    requests = _requests(50)
    assert Poisson(3.0).offsets(requests, 5) == Poisson(3.0).offsets(requests, 5)
    assert Poisson(3.0).offsets(requests, 5) != Poisson(3.0).offsets(requests, 6)


def test_bursts_release_groups_at_the_mean_rate() -> None:
    offsets = Bursts(rate=6.0, size=3).offsets(_requests(6000), seed=0)
    starts = offsets[::3]
    assert all(offsets[i] == starts[i // 3] for i in range(len(offsets)))
    assert abs(np.diff(starts).mean() - 0.5) < 0.03  # 3 requests per burst at 6 req/s
    assert len(Bursts(1.0, 4).offsets(_requests(5), 0)) == 5


def test_all_at_once_and_trace_times() -> None:
    assert AllAtOnce().offsets(_requests(3), 0) == [0.0, 0.0, 0.0]
    traced = [BenchRequest(0, "a", 1, arrival_s=0.0), BenchRequest(1, "b", 1, arrival_s=2.5)]
    assert TraceTimes().offsets(traced, 0) == [0.0, 2.5]


def test_invalid_rates_are_refused() -> None:
    for bad in (lambda: Poisson(0.0), lambda: Poisson(float("inf")), lambda: Bursts(1.0, 0)):
        with pytest.raises(ValueError):
            bad()


def test_a_sweep_keeps_the_kind_of_process() -> None:
    assert arrivals_at(Bursts(1.0, 4), 8.0) == Bursts(8.0, 4)
    assert arrivals_at(Poisson(1.0, 0.5), 3.0) == Poisson(3.0, 0.5)
    assert arrivals_at(AllAtOnce(), 2.0) == Poisson(2.0)
