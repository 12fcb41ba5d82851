"""The load generator against a fake client: schedules, concurrency, sessions and failures."""

from __future__ import annotations

import asyncio

import pytest

from bench.arrivals import AllAtOnce, Poisson
from bench.records import RequestRecord
from bench.runner import LoadGenerator, group_by_session, with_history
from bench.workload import BenchRequest


class FakeClient:
    """Answers every request after `delay_s` with `A<index>`; fails the indices in `fail`."""

    name = "fake"

    def __init__(self, delay_s: float = 0.01, fail: frozenset[int] = frozenset()) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.sent: list[BenchRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(self, request: BenchRequest) -> RequestRecord:
        self.sent.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.delay_s)
        self.in_flight -= 1
        ok = request.index not in self.fail
        return RequestRecord(index=request.index, success=ok, error="" if ok else "refused",
                             session=request.session, turn=request.turn, ttft_s=self.delay_s,
                             e2e_s=self.delay_s, output_tokens=1, text=f"A{request.index}")

    async def aclose(self) -> None:
        pass


def _run(client: FakeClient, requests: list[BenchRequest], arrivals=None, concurrency=None):
    generator = LoadGenerator(client, concurrency=concurrency, progress=False)
    return asyncio.run(generator.run(requests, arrivals or AllAtOnce(), seed=0))


def test_concurrency_caps_requests_in_flight() -> None:
    client = FakeClient()
    outcome = _run(client, [BenchRequest(i, [100], 1) for i in range(12)], concurrency=3)
    assert client.max_in_flight == 3
    assert [r.index for r in outcome.records] == list(range(12))
    assert outcome.duration_s >= 4 * client.delay_s


def test_requests_start_at_their_arrival_offsets() -> None:
    requests = [BenchRequest(i, [100], 1) for i in range(5)]
    offsets = Poisson(rate=50.0).offsets(requests, seed=0)
    outcome = _run(FakeClient(delay_s=0.0), requests, Poisson(rate=50.0))
    for record, offset in zip(outcome.records, offsets, strict=True):
        assert record.start_s == pytest.approx(offset, abs=0.02)
        assert record.start_s >= offset - 1e-3


def test_turns_wait_for_the_previous_one_and_carry_the_history() -> None:
    user = [{"role": "user", "content": f"Q{i}"} for i in range(3)]
    requests = [BenchRequest(i, [user[i]], 2, session=0, turn=i) for i in range(3)]
    requests.append(BenchRequest(3, [100, 101], 2))
    client = FakeClient()
    outcome = _run(client, requests)
    session_sent = [r for r in client.sent if r.session == 0]
    assert [r.turn for r in session_sent] == [0, 1, 2]
    assert session_sent[2].prompt == [
        user[0], {"role": "assistant", "content": "A0"},
        user[1], {"role": "assistant", "content": "A1"}, user[2],
    ]
    starts = [outcome.records[i].start_s for i in range(3)]
    assert starts[1] >= starts[0] + client.delay_s and starts[2] >= starts[1] + client.delay_s


def test_a_failed_turn_ends_its_session() -> None:
    requests = [BenchRequest(i, f"q{i}", 2, session=0, turn=i) for i in range(3)]
    outcome = _run(FakeClient(fail=frozenset({1})), requests)
    assert [r.success for r in outcome.records] == [True, False, False]
    assert "earlier turn" in outcome.records[2].error


def test_history_and_grouping_helpers() -> None:
    assert with_history(None, "", "a") == "a"
    assert with_history("Q1 ", "A1 ", "Q2") == "Q1 A1 Q2"
    with pytest.raises(ValueError):
        with_history([100], "x", [101])
    requests = [BenchRequest(0, "a", 1, session=1, turn=1), BenchRequest(1, "b", 1),
                BenchRequest(2, "c", 1, session=1, turn=0)]
    groups = group_by_session(requests)
    assert [[r.index for r in g] for g in groups] == [[2, 0], [1]]


def test_warmup_raises_when_the_server_fails() -> None:
    generator = LoadGenerator(FakeClient(fail=frozenset({-1})), progress=False)
    with pytest.raises(RuntimeError, match="warm-up"):
        asyncio.run(generator.warmup(1))


def test_warmup_sends_distinct_requests_at_once() -> None:
    """All at once, so that a router spreads them over its workers; distinct prompts, so that
    no prefix-aware policy sends them all where the first one went."""
    client = FakeClient()
    asyncio.run(LoadGenerator(client, progress=False).warmup(3))
    assert client.max_in_flight == 3
    assert len({r.prompt for r in client.sent}) == 3
    assert all(r.index < 0 for r in client.sent)  # never confused with a measured request
