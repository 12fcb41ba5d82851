"""One measured run: a workload sent through a client under one arrival process, summarised."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bench.arrivals import ArrivalProcess
from bench.client import BenchClient
from bench.metrics import summarize
from bench.records import RequestRecord
from bench.runner import LoadGenerator
from bench.settings import BenchSettings
from bench.structured import check_answers, structured_summary


@dataclass
class RunResult:
    """A run's label, its request rate (None when not rate-driven), summary and records."""

    label: str
    summary: dict[str, Any]
    records: list[RequestRecord] = field(default_factory=list)
    rate: float | None = None
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "rate": self.rate,
            "seed": self.seed,
            "summary": self.summary,
            "requests": [r.to_json() for r in self.records],
        }


async def measure(
    client: BenchClient,
    settings: BenchSettings,
    label: str,
    arrivals: ArrivalProcess | None = None,
    seed: int | None = None,
    rate: float | None = None,
) -> RunResult:
    """Run `settings`' workload (for `seed`, default the settings' own) on `arrivals`
    (default the settings' own) and summarise it; structured answers are checked
    (bench.structured)."""
    seed = settings.seed if seed is None else seed
    generator = LoadGenerator(client, settings.concurrency, settings.progress, label)
    requests = settings.requests(seed)
    outcome = await generator.run(requests, arrivals or settings.arrivals, seed)
    check_answers(requests, outcome.records)
    summary = summarize(outcome.records, outcome.duration_s, settings.slo)
    summary["structured_outputs"] = structured_summary(outcome.records)
    return RunResult(label, summary, outcome.records, rate, seed)


async def warm_up(client: BenchClient, settings: BenchSettings) -> None:
    """The settings' warm-up requests, one by one (RuntimeError when one fails)."""
    await LoadGenerator(client, progress=False).warmup(settings.warmup)
