"""Service-level objectives, SLO attainment and goodput, as DistServe defines them.

A request attains the SLO when it succeeded, its TTFT <= `ttft_ms` and its TPOT <= `tpot_ms`
(a limit left as None is not checked; a one-token answer has no TPOT and passes that check).

    attainment = requests attaining the SLO / all requests (failed ones count as misses)
    goodput    = requests attaining the SLO / run duration            (requests per second)

DistServe (Zhong et al., OSDI 2024) then asks for the highest request rate whose attainment
stays at or above a target such as 90%: see `bench.sweep.max_rate_at_attainment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.records import RequestRecord


@dataclass(slots=True)
class Slo:
    """Per-request latency limits in milliseconds, and the attainment target (a fraction)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    attainment_target: float = 0.9

    def __post_init__(self) -> None:
        if not 0.0 < self.attainment_target <= 1.0:
            raise ValueError(f"attainment target must be in (0, 1], got {self.attainment_target}")

    @property
    def is_set(self) -> bool:
        """True when at least one latency limit is given."""
        return self.ttft_ms is not None or self.tpot_ms is not None

    def attained_by(self, record: RequestRecord) -> bool:
        """Whether `record` succeeded within both limits."""
        if not record.success or record.ttft_s is None:
            return False
        if self.ttft_ms is not None and record.ttft_s * 1e3 > self.ttft_ms:
            return False
        tpot = record.tpot_s
        return self.tpot_ms is None or tpot is None or tpot * 1e3 <= self.tpot_ms

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def attainment(records: Sequence[RequestRecord], slo: Slo) -> float:
    """Fraction of all requests attaining `slo` (0 for no requests)."""
    if not records:
        return 0.0
    return sum(slo.attained_by(r) for r in records) / len(records)


def goodput(records: Sequence[RequestRecord], slo: Slo, duration_s: float) -> float:
    """Requests per second attaining `slo` over a run of `duration_s` seconds."""
    if duration_s <= 0:
        return 0.0
    return sum(slo.attained_by(r) for r in records) / duration_s
