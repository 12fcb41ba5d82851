"""The load generator: releases requests on their arrival schedule and collects the records.

Requests without a session are released independently at their arrival offsets. A session is
released at its first turn's offset and then runs turn after turn: each turn waits for the
previous one and is sent with the conversation so far (`with_history`); when a turn fails, the
session's remaining turns are recorded as failed without being sent. An optional concurrency
limit caps the requests in flight. The run's duration runs from the start to the last answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from tqdm import tqdm

from bench.arrivals import ArrivalProcess
from bench.client import BenchClient
from bench.records import RequestRecord
from bench.workload import BenchRequest, Prompt, prompt_kind

WARMUP_PROMPT = "Warm-up request {}: say hello."
WARMUP_MAX_TOKENS = 4


@dataclass(slots=True)
class RunOutcome:
    """Every request's record (in request order) and the run's duration in seconds."""

    records: list[RequestRecord]
    duration_s: float


def with_history(history: Prompt | None, answer: str, new: Prompt) -> Prompt:
    """The next turn's prompt: the previous prompt, its answer, then the new turn."""
    if history is None:
        return new
    if prompt_kind(history) == "messages" and prompt_kind(new) == "messages":
        assert isinstance(history, list) and isinstance(new, list)
        return [*history, {"role": "assistant", "content": answer}, *new]  # type: ignore[list-item]
    if isinstance(history, str) and isinstance(new, str):
        return history + answer + new
    raise ValueError("a session's turns must all be text or all be chat messages")


def group_by_session(requests: Sequence[BenchRequest]) -> list[list[BenchRequest]]:
    """Requests grouped into sessions (turn order), each sessionless request on its own;
    groups are ordered by their first request's index."""
    sessions: dict[int, list[BenchRequest]] = {}
    groups: list[list[BenchRequest]] = []
    for request in requests:
        if request.session is None:
            groups.append([request])
        elif request.session in sessions:
            sessions[request.session].append(request)
        else:
            sessions[request.session] = [request]
            groups.append(sessions[request.session])
    for group in groups:
        group.sort(key=lambda r: r.turn)
    return groups


class LoadGenerator:
    """Runs one workload through one client; `run` is the whole benchmark of one setting."""

    def __init__(
        self, client: BenchClient, concurrency: int | None = None, progress: bool = True,
        label: str = "bench",
    ) -> None:
        self.client = client
        self.concurrency = concurrency
        self.progress = progress
        self.label = label

    async def run(
        self, requests: Sequence[BenchRequest], arrivals: ArrivalProcess, seed: int
    ) -> RunOutcome:
        """Send every request on `arrivals`' schedule; records in request order."""
        groups = group_by_session(requests)
        offsets = arrivals.offsets([g[0] for g in groups], seed)
        limit: Any = (
            asyncio.Semaphore(self.concurrency) if self.concurrency else contextlib.nullcontext()
        )
        bar = tqdm(total=len(requests), desc=self.label, unit="req", disable=not self.progress)
        start = time.perf_counter()
        try:
            done = await asyncio.gather(*(
                self._session(group, start + offset, start, limit, bar)
                for group, offset in zip(groups, offsets, strict=True)
            ))
        finally:
            bar.close()
        duration = time.perf_counter() - start
        records = sorted((r for rs in done for r in rs), key=lambda r: r.index)
        return RunOutcome(records, duration)

    async def _session(
        self, group: list[BenchRequest], release: float, start: float, limit: Any, bar: tqdm
    ) -> list[RequestRecord]:
        await asyncio.sleep(max(0.0, release - time.perf_counter()))
        records: list[RequestRecord] = []
        history: Prompt | None = None
        for request in group:
            if records and not records[-1].success:
                records.append(_skipped(request))
            else:
                answer = records[-1].text if records else ""
                full = replace(request, prompt=with_history(history, answer, request.prompt))
                async with limit:
                    sent = time.perf_counter() - start
                    record = await self.client.send(full)
                record.start_s = sent
                records.append(record)
                history = full.prompt
            bar.update(1)
        return records

    async def warmup(self, count: int) -> None:
        """Send `count` short requests, distinct and all at once (so that a router spreads them
        over its workers: each pays its first request's one-time costs before anything is
        measured); RuntimeError if one fails."""
        requests = [
            BenchRequest(-1 - i, WARMUP_PROMPT.format(i), WARMUP_MAX_TOKENS) for i in range(count)
        ]
        records = await asyncio.gather(*(self.client.send(r) for r in requests))
        for record in records:
            if not record.success:
                raise RuntimeError(f"warm-up request failed: {record.error}")


def _skipped(request: BenchRequest) -> RequestRecord:
    return RequestRecord(
        index=request.index, session=request.session, turn=request.turn,
        error="not sent: an earlier turn of its session failed",
    )
