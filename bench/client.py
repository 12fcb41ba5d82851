"""The interface of a benchmark client, and the sampling options every client sends.

A client sends one request, streams its answer, and measures it into a `RequestRecord`:
`OpenAIClient` (any OpenAI-compatible HTTP server: Baton's router, vLLM, SGLang) and
`BatonGrpcClient` (`baton.v1.Router/Generate`). Clients never raise for a failed request: the
record says `success=False` and why.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.records import RequestRecord
from bench.workload import BenchRequest


@dataclass(slots=True)
class ClientOptions:
    """What every request carries besides its prompt.

    `model`: the served model name ('' lets a Baton router pick its one model).
    `temperature`: 0 is greedy. `ignore_eos`: generate exactly `max_tokens` (vLLM's extra field).
    `timeout_s`: the longest one request may take, seconds. `extra_body`: further JSON fields.
    """

    model: str = ""
    temperature: float = 0.0
    ignore_eos: bool = True
    timeout_s: float = 600.0
    extra_body: dict[str, Any] = field(default_factory=dict)


class BenchClient(Protocol):
    """Sends requests and measures them; used from one asyncio event loop."""

    name: str

    async def send(self, request: BenchRequest) -> RequestRecord:
        """Stream `request` (its prompt complete) and measure it; never raises for failures."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


class StreamClock:
    """Turns arrival times of streamed pieces into TTFT, ITLs and end-to-end latency (s)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.last: float | None = None
        self.ttft_s: float | None = None
        self.itl_s: list[float] = []

    def piece(self) -> None:
        """Note that a piece of the answer (one or more tokens) arrived now."""
        now = time.perf_counter()
        if self.last is None:
            self.ttft_s = now - self.start
        else:
            self.itl_s.append(now - self.last)
        self.last = now

    def finish(self, record: RequestRecord) -> RequestRecord:
        """Fill `record`'s timings; e2e runs until now."""
        record.ttft_s, record.itl_s = self.ttft_s, self.itl_s
        record.e2e_s = time.perf_counter() - self.start
        return record
