"""Scheduling policies: the waiting queue a policy admits from, and whom it preempts.

A policy is the scheduler's one replaceable part for ordering. `fcfs` is vLLM's default;
`priority` is vLLM's priority scheduling (lower `Request.priority` first) plus optional aging;
`fair` shares admission round robin across `Request.tenant`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from engine.request import Request
from engine.scheduler.queues import (
    FairShareQueue,
    FCFSQueue,
    PriorityQueue,
    RequestQueue,
    priority_key,
)

POLICIES = ("fcfs", "priority", "fair")


class SchedulingPolicy(ABC):
    """Admission order (through the queue it makes) and the preemption victim."""

    name: str

    @abstractmethod
    def new_queue(self) -> RequestQueue:
        """A new, empty waiting queue in this policy's admission order."""

    @abstractmethod
    def pick_victim(self, running: Sequence[Request]) -> Request:
        """The request to preempt when KV blocks run out.

        `running` is in admission order (latest admitted last) and must not be empty.
        """


class FCFSPolicy(SchedulingPolicy):
    """First come, first served; the latest admitted request is preempted first."""

    name = "fcfs"

    def new_queue(self) -> RequestQueue:
        return FCFSQueue()

    def pick_victim(self, running: Sequence[Request]) -> Request:
        _check_running(running)
        return running[-1]


class PriorityPolicy(SchedulingPolicy):
    """Lowest `priority` first, ties by arrival; see `PriorityQueue` for aging and its bound.

    The victim is the running request that would be admitted last: the largest
    `priority_key` (vLLM: max by (priority, arrival_time)), ties to the latest admitted. Using
    the same aged key for both keeps an aged-in request from being preempted straight away.
    """

    name = "priority"

    def __init__(self, aging_seconds: float | None = 60.0) -> None:
        if aging_seconds is not None and not aging_seconds > 0:
            raise ValueError(f"aging_seconds must be > 0 or None, got {aging_seconds}")
        self.aging_seconds = aging_seconds

    def new_queue(self) -> RequestQueue:
        return PriorityQueue(self.aging_seconds)

    def pick_victim(self, running: Sequence[Request]) -> Request:
        _check_running(running)
        index = max(
            range(len(running)),
            key=lambda i: (*priority_key(running[i], self.aging_seconds), i),
        )
        return running[index]


class FairSharePolicy(SchedulingPolicy):
    """Round robin of admission across tenants (`FairShareQueue`).

    The victim is the latest-arrived running request of the tenant with the most requests
    running; ties go to the tenant whose latest request arrived last.
    """

    name = "fair"

    def new_queue(self) -> RequestQueue:
        return FairShareQueue()

    def pick_victim(self, running: Sequence[Request]) -> Request:
        _check_running(running)
        counts: dict[str, int] = {}
        latest: dict[str, int] = {}  # tenant -> index in `running` of its latest arrival
        for i, request in enumerate(running):
            counts[request.tenant] = counts.get(request.tenant, 0) + 1
            j = latest.get(request.tenant)
            if j is None or request.arrival_time >= running[j].arrival_time:
                latest[request.tenant] = i
        tenant = max(counts, key=lambda t: (counts[t], running[latest[t]].arrival_time, latest[t]))
        return running[latest[tenant]]


def make_policy(name: str, aging_seconds: float | None = 60.0) -> SchedulingPolicy:
    """The policy called `name` (one of `POLICIES`).

    `aging_seconds` (seconds of waiting per priority level gained; None: no aging) applies to
    `priority` only.
    """
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        return PriorityPolicy(aging_seconds)
    if name == "fair":
        return FairSharePolicy()
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")


def _check_running(running: Sequence[Request]) -> None:
    if not running:
        raise ValueError("pick_victim: no running request to preempt")
