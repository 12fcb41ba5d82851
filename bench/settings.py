"""Everything that defines one benchmark's load, besides the target: what a rerun needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.arrivals import AllAtOnce, ArrivalProcess
from bench.slo import Slo
from bench.structured import StructuredOutputSpec
from bench.workload import BenchRequest, Workload, prompt_kind


@dataclass
class BenchSettings:
    """The workload, its size and seed, the arrival process, the client-side limits and SLO.

    `vocab_size` bounds token-id prompts (None for text workloads). `concurrency`: most requests
    in flight (None: no limit). `warmup`: short requests sent before measuring.
    `structured`: the structured-outputs constraint that a share of the requests carry.
    """

    workload: Workload
    num_requests: int
    seed: int = 0
    vocab_size: int | None = None
    arrivals: ArrivalProcess = field(default_factory=AllAtOnce)
    concurrency: int | None = None
    slo: Slo = field(default_factory=Slo)
    warmup: int = 1
    progress: bool = True
    structured: StructuredOutputSpec | None = None

    def requests(self, seed: int | None = None) -> list[BenchRequest]:
        """The workload's requests for `seed` (default: the settings' seed), the chosen ones
        carrying the structured-outputs constraint."""
        seed = self.seed if seed is None else seed
        requests = self.workload.generate(self.num_requests, seed, self.vocab_size)
        return requests if self.structured is None else self.structured.apply(requests, seed)

    def describe(self) -> dict[str, Any]:
        """The workload (parameters and realised lengths), arrivals, limits and SLO."""
        requests = self.requests()
        return {
            "workload": {
                **self.workload.describe(),
                "num_requests": len(requests),  # a trace may hold fewer than asked for
                "seed": self.seed,
                "vocab_size": self.vocab_size,
                "stats": workload_stats(requests),
            },
            "arrivals": self.arrivals.describe(),
            "concurrency": self.concurrency,
            "slo": self.slo.describe(),
            "warmup_requests": self.warmup,
            "structured_outputs": None if self.structured is None else {
                **self.structured.describe(),
                "requests": [r.index for r in requests if r.structured_outputs is not None],
            },
        }


def _stats(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "p50": float(np.median(arr)), "min": float(arr.min()),
            "max": float(arr.max())}


def workload_stats(requests: list[BenchRequest]) -> dict[str, Any]:
    """Counts and length statistics of the generated requests.

    `input_tokens` covers token-id prompts only (text is measured by the server's usage);
    `max_tokens` is the output length asked for.
    """
    kinds = sorted({prompt_kind(r.prompt) for r in requests})
    sessions = {r.session for r in requests if r.session is not None}
    token_lens = [len(r.prompt) for r in requests if prompt_kind(r.prompt) == "token_ids"]
    return {
        "requests": len(requests),
        "sessions": len(sessions),
        "prompt_kinds": kinds,
        "input_tokens": _stats(token_lens),
        "max_tokens": _stats([r.max_tokens for r in requests]),
    }
