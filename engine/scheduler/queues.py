"""Waiting queues: the order in which the scheduler admits requests.

`FCFSQueue` (arrival order), `PriorityQueue` (lowest `priority` first, with optional aging) and
`FairShareQueue` (round robin across tenants). `engine.scheduler.policies` pairs each with its
preemption rule.
"""

from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Iterator

from engine.request import Request


class RequestQueue(ABC):
    """The waiting requests, in admission order."""

    @abstractmethod
    def add(self, request: Request) -> None:
        """A new request arrives."""

    @abstractmethod
    def prepend(self, request: Request) -> None:
        """A preempted request comes back; it goes ahead of the new ones."""

    @abstractmethod
    def peek(self) -> Request:
        """The next request to admit (IndexError when empty)."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return `peek()`."""

    @abstractmethod
    def remove(self, request: Request) -> None:
        """Take out a request that will not run (aborted)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]: ...


class FCFSQueue(RequestQueue):
    """First come, first served."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


def priority_key(request: Request, aging_seconds: float | None) -> tuple[float, float]:
    """A request's admission key: smaller runs first; (rank, arrival_time in seconds).

    rank = `priority + arrival_time / aging_seconds`: the request's effective priority
    `priority - (now - arrival_time) / aging_seconds` shifted by the same `now / aging_seconds`
    for every request, so the order it gives never changes while time passes. Without aging
    (`aging_seconds=None`) rank is the bare `priority`.
    """
    if aging_seconds is None:
        return float(request.priority), request.arrival_time
    return request.priority + request.arrival_time / aging_seconds, request.arrival_time


class PriorityQueue(RequestQueue):
    """Lowest `priority` first, then earliest arrival, then insertion order; optional aging.

    With `aging_seconds` set, a waiting request's effective priority improves by one level per
    `aging_seconds` of waiting, so nothing waits forever. Starvation bound: a request of priority
    `p` waits behind a later arrival of priority `q` only if that arrival came within
    `(p - q) * aging_seconds` seconds of it; anything arriving later than
    `(p - min priority) * aging_seconds` after it is admitted after it.

    A binary heap keyed by `priority_key`, fixed at enqueue time (changing `request.priority`
    while it waits has no effect). peek/pop are O(log n) amortized; `remove` is O(1) and lazy:
    the heap entry is dropped when it surfaces, and the heap is rebuilt once dead entries
    outnumber live ones.
    """

    def __init__(self, aging_seconds: float | None = None) -> None:
        if aging_seconds is not None and not aging_seconds > 0:
            raise ValueError(f"aging_seconds must be > 0 or None, got {aging_seconds}")
        self.aging_seconds = aging_seconds
        self._heap: list[tuple[float, float, int, Request]] = []
        self._live: dict[Request, int] = {}  # request -> sequence number of its live entry
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        if request in self._live:
            raise ValueError(f"request {request.request_id!r} is already waiting")
        seq = next(self._counter)
        self._live[request] = seq
        heapq.heappush(self._heap, (*priority_key(request, self.aging_seconds), seq, request))

    def prepend(self, request: Request) -> None:
        """A preempted request re-enters by its key; its original arrival keeps it early."""
        self.add(request)

    def peek(self) -> Request:
        self._drop_dead_top()
        if not self._heap:
            raise IndexError("peek from an empty queue")
        return self._heap[0][3]

    def pop(self) -> Request:
        request = self.peek()
        heapq.heappop(self._heap)
        del self._live[request]
        return request

    def remove(self, request: Request) -> None:
        if self._live.pop(request, None) is None:
            raise ValueError(f"request {request.request_id!r} is not waiting")
        if len(self._heap) > 2 * len(self._live) + 16:
            self._heap = [e for e in self._heap if self._live.get(e[3]) == e[2]]
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Request]:
        """The waiting requests in admission order (O(n log n): a sorted copy)."""
        live = [e for e in self._heap if self._live.get(e[3]) == e[2]]
        return iter([e[3] for e in sorted(live)])

    def _drop_dead_top(self) -> None:
        heap = self._heap
        while heap and self._live.get(heap[0][3]) != heap[0][2]:
            heapq.heappop(heap)


class FairShareQueue(RequestQueue):
    """Round robin of admission across `request.tenant`, first come, first served within one.

    A tenant with requests waiting holds one place in the rotation; each pop serves the tenant
    at its head and moves it to the back, so a tenant's flood delays another tenant's request by
    at most one pop per other waiting tenant. A tenant with nothing waiting leaves the rotation
    and rejoins at the back. A preempted request goes to the front of its tenant's queue (ahead
    of that tenant's new requests, not ahead of other tenants'). All operations are O(1).
    """

    def __init__(self) -> None:
        self._by_tenant: dict[str, OrderedDict[Request, None]] = {}
        self._rotation: OrderedDict[str, None] = OrderedDict()  # tenants with requests waiting
        self._len = 0

    def add(self, request: Request) -> None:
        self._tenant_queue(request)[request] = None
        self._len += 1

    def prepend(self, request: Request) -> None:
        queue = self._tenant_queue(request)
        queue[request] = None
        queue.move_to_end(request, last=False)
        self._len += 1

    def peek(self) -> Request:
        if not self._rotation:
            raise IndexError("peek from an empty queue")
        return next(iter(self._by_tenant[next(iter(self._rotation))]))

    def pop(self) -> Request:
        request = self.peek()
        self._discard(request)
        if request.tenant in self._rotation:
            self._rotation.move_to_end(request.tenant)
        return request

    def remove(self, request: Request) -> None:
        queue = self._by_tenant.get(request.tenant)
        if queue is None or request not in queue:
            raise ValueError(f"request {request.request_id!r} is not waiting")
        self._discard(request)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Request]:
        """The waiting requests in the order they would be popped if nothing else arrived."""
        turns = deque(iter(self._by_tenant[t]) for t in self._rotation)
        while turns:
            tenant_requests = turns.popleft()
            request = next(tenant_requests, None)
            if request is not None:
                yield request
                turns.append(tenant_requests)

    def _tenant_queue(self, request: Request) -> OrderedDict[Request, None]:
        """The tenant's queue, entering the tenant into the rotation; rejects duplicates."""
        queue = self._by_tenant.setdefault(request.tenant, OrderedDict())
        if request in queue:
            raise ValueError(f"request {request.request_id!r} is already waiting")
        self._rotation[request.tenant] = None
        return queue

    def _discard(self, request: Request) -> None:
        queue = self._by_tenant[request.tenant]
        del queue[request]
        self._len -= 1
        if not queue:
            del self._by_tenant[request.tenant]
            del self._rotation[request.tenant]
