"""Scheduling policies: queue order, aging, fair share, victims, and the overload error."""

from __future__ import annotations

import pickle
import random

import pytest

from engine.config import SchedulerConfig
from engine.errors import EngineOverloadedError
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler.policies import POLICIES, SchedulingPolicy, make_policy
from engine.scheduler.queues import FairShareQueue, FCFSQueue, PriorityQueue, RequestQueue
from engine.scheduler.scheduler import Scheduler


def _request(
    rid: str,
    arrival: float = 0.0,
    priority: int = 0,
    tenant: str = "default",
    prompt_len: int = 3,
    max_tokens: int = 4,
) -> Request:
    params = SamplingParams(max_tokens=max_tokens)
    return Request(
        rid,
        list(range(1, prompt_len + 1)),
        params,
        max_tokens,
        eos_token_ids=(0,),
        arrival_time=arrival,
        priority=priority,
        tenant=tenant,
    )


def _ids(requests) -> list[str]:
    return [r.request_id for r in requests]


def _drain(queue: RequestQueue) -> list[str]:
    order = []
    while queue:
        assert queue.peek() is queue.peek()
        order.append(queue.pop().request_id)
    return order


# --- make_policy ------------------------------------------------------------------------------


def test_make_policy_names_and_queues():
    kinds = {"fcfs": FCFSQueue, "priority": PriorityQueue, "fair": FairShareQueue}
    assert POLICIES == ("fcfs", "priority", "fair")
    for name in POLICIES:
        policy = make_policy(name)
        assert isinstance(policy, SchedulingPolicy) and policy.name == name
        queue = policy.new_queue()
        assert isinstance(queue, kinds[name]) and len(queue) == 0
        assert queue is not policy.new_queue()


def test_make_policy_rejects_unknown_name_and_bad_aging():
    with pytest.raises(ValueError, match="policy.*fcfs, priority, fair.*'lifo'"):
        make_policy("lifo")
    with pytest.raises(ValueError, match="aging_seconds"):
        make_policy("priority", aging_seconds=0)
    assert make_policy("priority", aging_seconds=None).new_queue().aging_seconds is None


@pytest.mark.parametrize("name", POLICIES)
def test_every_queue_follows_the_interface(name):
    queue = make_policy(name).new_queue()
    with pytest.raises(IndexError):
        queue.peek()
    with pytest.raises(IndexError):
        queue.pop()
    reqs = [_request(f"r{i}", arrival=i) for i in range(5)]
    for r in reqs:
        queue.add(r)
    assert len(queue) == 5 and _ids(queue) == ["r0", "r1", "r2", "r3", "r4"]
    queue.remove(reqs[2])
    assert len(queue) == 4 and _ids(queue) == ["r0", "r1", "r3", "r4"]
    first = queue.pop()
    queue.prepend(first)  # preempted: back to the front
    assert _ids(queue) == ["r0", "r1", "r3", "r4"]
    with pytest.raises(ValueError):
        queue.remove(reqs[2])
    assert _drain(queue) == ["r0", "r1", "r3", "r4"]
    assert len(queue) == 0 and not queue and list(queue) == []


# --- priority ---------------------------------------------------------------------------------


def test_priority_orders_by_priority_then_arrival_then_insertion():
    queue = PriorityQueue(aging_seconds=None)
    queue.add(_request("p2", arrival=0, priority=2))
    queue.add(_request("p0_late", arrival=5, priority=0))
    queue.add(_request("p0_early", arrival=1, priority=0))
    queue.add(_request("p0_tie_a", arrival=3, priority=0))
    queue.add(_request("p0_tie_b", arrival=3, priority=0))
    queue.add(_request("neg", arrival=9, priority=-1))
    expected = ["neg", "p0_early", "p0_tie_a", "p0_tie_b", "p0_late", "p2"]
    assert _ids(queue) == expected
    assert _drain(queue) == expected


def test_priority_prepend_reinserts_by_key():
    queue = PriorityQueue(aging_seconds=None)
    early, high, late = _request("early", 0), _request("high", 9, priority=-1), _request("late", 5)
    for r in (early, high, late):
        queue.add(r)
    assert queue.pop() is high
    assert queue.pop() is early
    queue.prepend(high)  # keeps its priority
    queue.prepend(early)  # its old arrival keeps it ahead of "late"
    assert _drain(queue) == ["high", "early", "late"]


def test_priority_remove_is_lazy_but_len_exact():
    queue = PriorityQueue(aging_seconds=10)
    reqs = [_request(f"r{i}", arrival=i, priority=i % 3) for i in range(200)]
    for r in reqs:
        queue.add(r)
    for r in reqs[::2]:
        queue.remove(r)
    assert len(queue) == 100
    assert len(queue._heap) <= 2 * len(queue) + 16  # dead entries are compacted
    assert queue.peek() is min(reqs[1::2], key=lambda r: r.priority + r.arrival_time / 10)
    assert sorted(_drain(queue)) == sorted(_ids(reqs[1::2]))
    queue.add(reqs[1])
    with pytest.raises(ValueError, match="already waiting"):
        queue.add(reqs[1])


def test_priority_aging_admits_old_low_priority_request():
    queue = PriorityQueue(aging_seconds=10)
    queue.add(_request("p0_at_60", arrival=60, priority=0))
    queue.add(_request("p5_at_0", arrival=0, priority=5))
    queue.add(_request("p0_at_40", arrival=40, priority=0))
    # At any time t the p5 request's effective priority is 5 - t/10, the p0's -(t - 40)/10
    # and -(t - 60)/10: aged by 50 s it is worth 0 at t=50.
    assert _drain(queue) == ["p0_at_40", "p5_at_0", "p0_at_60"]


def _admit_under_stream(queue: PriorityQueue, low: Request, ticks: int) -> list[Request] | None:
    """One priority-0 arrival per second (t=1, 2, ...), one pop per second.

    The requests popped before `low`, or None if `low` is not popped within `ticks` seconds.
    """
    queue.add(low)
    before: list[Request] = []
    for t in range(1, ticks + 1):
        queue.add(_request(f"high{t}", arrival=low.arrival_time + t, priority=0))
        popped = queue.pop()
        if popped is low:
            return before
        before.append(popped)
    return None


def test_priority_starvation_bound():
    aging, low_priority = 10.0, 5
    bound = (low_priority - 0) * aging  # seconds: the documented bound
    low = _request("low", arrival=100.0, priority=low_priority)
    before = _admit_under_stream(PriorityQueue(aging), low, ticks=1000)
    assert before is not None and len(before) > 0  # it did wait behind later arrivals...
    assert all(0 < r.arrival_time - low.arrival_time < bound for r in before)
    assert len(before) >= bound - 1  # ...exactly those within the bound
    starved = _request("low", arrival=100.0, priority=low_priority)
    assert _admit_under_stream(PriorityQueue(None), starved, ticks=1000) is None  # no aging


def test_priority_victim_is_worst_key_ties_to_latest():
    policy = make_policy("priority", aging_seconds=None)
    a, b = _request("a", 0, priority=1), _request("b", 5, priority=0)
    c, d = _request("c", 3, priority=1), _request("d", 3, priority=1)
    assert policy.pick_victim([a, b]) is a  # not the last admitted
    assert policy.pick_victim([a, c, b]) is c  # same priority: latest arrival
    assert policy.pick_victim([a, d, c, b]) is c  # same arrival too: latest admitted
    aged = make_policy("priority", aging_seconds=10)
    old_low, new_high = _request("old_low", 0, priority=5), _request("new_high", 60, priority=0)
    assert aged.pick_victim([old_low, new_high]) is new_high  # the one admitted last by key
    with pytest.raises(ValueError, match="no running request"):
        policy.pick_victim([])


# --- fcfs -------------------------------------------------------------------------------------


def test_fcfs_victim_is_latest_admitted():
    policy = make_policy("fcfs")
    a, b, c = _request("a", 2), _request("b", 0), _request("c", 1)
    assert policy.pick_victim([a, b, c]) is c
    assert policy.pick_victim([a]) is a


# --- fair share -------------------------------------------------------------------------------


def test_fair_flood_does_not_starve_single_request():
    queue = FairShareQueue()
    for i in range(100):
        queue.add(_request(f"a{i}", arrival=i, tenant="A"))
    queue.add(_request("b0", arrival=100, tenant="B"))
    assert "b0" in [queue.pop().request_id, queue.pop().request_id]
    assert len(queue) == 99
    assert _drain(queue) == [f"a{i}" for i in range(1, 100)]


@pytest.mark.parametrize("seed", range(5))
def test_fair_interleaved_prefixes_stay_balanced(seed):
    tenants = ["A"] * 50 + ["B"] * 50
    random.Random(seed).shuffle(tenants)
    queue = FairShareQueue()
    counters = {"A": 0, "B": 0}
    for t, tenant in enumerate(tenants):
        queue.add(_request(f"{tenant}{counters[tenant]}", arrival=t, tenant=tenant))
        counters[tenant] += 1
    assert len(queue) == 100
    iter_order = _ids(queue)
    order = _drain(queue)
    assert order == iter_order
    counts = {"A": 0, "B": 0}
    for rid in order:
        counts[rid[0]] += 1
        if counts["A"] < 50 and counts["B"] < 50:
            assert abs(counts["A"] - counts["B"]) <= 1
    for tenant in "AB":  # FIFO within a tenant
        assert [r for r in order if r[0] == tenant] == [f"{tenant}{i}" for i in range(50)]


def test_fair_prepend_goes_to_front_of_its_tenant():
    queue = FairShareQueue()
    a0, a1, b0 = (
        _request("a0", 0, tenant="A"),
        _request("a1", 1, tenant="A"),
        _request("b0", 2, tenant="B"),
    )
    for r in (a0, a1, b0):
        queue.add(r)
    assert queue.pop() is a0
    queue.prepend(a0)  # ahead of a1, but B's turn comes first
    assert _ids(queue) == ["b0", "a0", "a1"]
    assert _drain(queue) == ["b0", "a0", "a1"]


def test_fair_tenant_with_nothing_waiting_leaves_rotation():
    queue = FairShareQueue()
    a0, b0 = _request("a0", tenant="A"), _request("b0", tenant="B")
    queue.add(a0)
    queue.add(b0)
    queue.remove(a0)
    assert queue.peek() is b0 and len(queue) == 1 and queue._rotation == {"B": None}
    queue.add(_request("a1", tenant="A"))
    queue.add(_request("b1", tenant="B"))
    assert _drain(queue) == ["b0", "a1", "b1"]
    assert not queue._by_tenant and not queue._rotation


def test_fair_victim_from_tenant_with_most_running():
    policy = make_policy("fair")
    a0, a1 = _request("a0", 0, tenant="A"), _request("a1", 1, tenant="A")
    b0, b1, b2 = (
        _request("b0", 2, tenant="B"),
        _request("b1", 4, tenant="B"),
        _request("b2", 3, tenant="B"),
    )
    assert policy.pick_victim([a0, b0, b1, a1, b2]) is b1  # B runs 3: its latest arrival
    assert policy.pick_victim([a0, a1, b0, b2]) is b2  # 2 each: B's latest (3) beats A's (1)
    assert policy.pick_victim([a0, b0]) is b0


# --- errors -----------------------------------------------------------------------------------


def test_engine_overloaded_error():
    err = EngineOverloadedError(num_waiting=10, max_num_waiting=10)
    assert isinstance(err, RuntimeError)
    assert (err.num_waiting, err.max_num_waiting, err.retry_after_s) == (10, 10, 1.0)
    assert "max_num_waiting" in str(err) and "too many requests waiting" in str(err)
    copy = pickle.loads(pickle.dumps(EngineOverloadedError(3, 2, retry_after_s=0.5)))
    assert (copy.num_waiting, copy.max_num_waiting, copy.retry_after_s) == (3, 2, 0.5)
    assert str(copy) == str(EngineOverloadedError(3, 2, 0.5))


# --- end to end through the Scheduler ---------------------------------------------------------


def _scheduler(policy: str, num_blocks=64, block_size=4, tokens=64, seqs=8) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, enable_caching=False)
    config = SchedulerConfig(tokens, seqs)
    return Scheduler(config, kv, 1000, policy=make_policy(policy, aging_seconds=None))


def _run_step(sched: Scheduler, token: int = 7):
    out = sched.schedule()
    sampled = {s.request.request_id: token for s in out.scheduled if s.samples}
    sched.update_from_output(out, sampled)
    return out


def _run_to_completion(sched: Scheduler) -> list[str]:
    """Step until done; the ids in order of finishing."""
    finished: list[str] = []
    for _ in range(200):
        if not sched.has_unfinished_requests():
            return finished
        before = set(sched.requests)
        _run_step(sched)
        finished += sorted(before - set(sched.requests))
    raise AssertionError("scheduler did not finish")


def test_scheduler_admits_by_priority():
    sched = _scheduler("priority", seqs=1)
    sched.add_request(_request("low", arrival=0, priority=5))
    sched.add_request(_request("high", arrival=1, priority=0))
    assert _ids(s.request for s in _run_step(sched).scheduled) == ["high"]
    assert _run_to_completion(sched) == ["high", "low"]
    sched.kv.check_integrity(expect_all_free=True)


def test_scheduler_preempts_policy_victim_not_last_admitted():
    sched = _scheduler("priority", num_blocks=4, block_size=4)
    low = _request("low", arrival=0, priority=1, prompt_len=7, max_tokens=8)
    high = _request("high", arrival=1, priority=0, prompt_len=7, max_tokens=8)
    sched.add_request(low)
    _run_step(sched)  # low prefilled: 2 blocks
    sched.add_request(high)
    _run_step(sched)  # high prefilled: 2 blocks, pool full; running = [low, high]
    out = _run_step(sched)  # low needs a 3rd block: fcfs would preempt high
    assert _ids(out.preempted) == ["low"]
    assert low.status == RequestStatus.PREEMPTED and high.status == RequestStatus.RUNNING
    sched.kv.check_integrity()
    assert _run_to_completion(sched) == ["high", "low"]
    assert low.output_token_ids == [7] * 8 and high.output_token_ids == [7] * 8
    sched.kv.check_integrity(expect_all_free=True)


def test_scheduler_fair_share_admits_other_tenant():
    sched = _scheduler("fair", seqs=2)
    for i in range(20):
        sched.add_request(_request(f"a{i}", arrival=i, tenant="A"))
    sched.add_request(_request("b0", arrival=20, tenant="B"))
    assert _ids(s.request for s in _run_step(sched).scheduled) == ["a0", "b0"]
    assert len(_run_to_completion(sched)) == 21
    sched.kv.check_integrity(expect_all_free=True)


def test_scheduler_default_policy_is_fcfs():
    kv = KVCacheManager(64, 4, enable_caching=False)
    sched = Scheduler(SchedulerConfig(64, 1), kv, 1000)
    sched.add_request(_request("first", arrival=1, priority=9))
    sched.add_request(_request("second", arrival=0, priority=0))
    assert _run_to_completion(sched) == ["first", "second"]
