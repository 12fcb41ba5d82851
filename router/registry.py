"""The worker registry: one channel per worker and a background poll of health and load.

Every `poll_interval_s` seconds each worker gets a `grpc.health.v1` check and a `GetLoad`, both
with a deadline, concurrently. A worker that fails either (or reports another role) is marked
unhealthy and skipped by routing until it answers again.

Workers come and go (`add`, `drain`, `remove`: the admin API, Kubernetes endpoints): a worker
that leaves drains first, getting no new requests until this router has nothing in flight
there and two polls found it idle, and only then is its channel closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.baton.v1 import common_pb2
from router.errors import rpc_status
from router.workers import Role, WorkerInfo

log = logging.getLogger(__name__)


class WorkerRegistry:
    """All configured workers, by role, with their latest health and load."""

    def __init__(
        self,
        addresses: dict[Role, Iterable[str]],
        served_model_name: str,
        poll_interval_s: float = 0.5,
        poll_timeout_s: float = 1.0,
    ) -> None:
        self.workers = [
            WorkerInfo.connect(address, role)
            for role, role_addresses in addresses.items()
            for address in role_addresses
        ]
        self.served_model_name = served_model_name
        self.poll_interval_s = poll_interval_s
        self.poll_timeout_s = poll_timeout_s
        self._task: asyncio.Task[None] | None = None
        self._warned_models: set[str] = set()

    def configured(self, role: Role) -> list[WorkerInfo]:
        """Every worker of `role`, healthy or not."""
        return [w for w in self.workers if w.role == role]

    def healthy(self, role: Role) -> list[WorkerInfo]:
        """The workers of `role` that answered the latest poll and are not draining."""
        return [w for w in self.workers if w.role == role and w.healthy and not w.draining]

    def find(self, address: str) -> WorkerInfo | None:
        """The worker at `address`, if registered."""
        return next((w for w in self.workers if w.address == address), None)

    async def add(self, address: str, role: Role) -> WorkerInfo:
        """Register a worker (polled at once); one already there stops draining. ValueError
        if `address` is registered with another role."""
        worker = self.find(address)
        if worker is not None:
            if worker.role != role:
                raise ValueError(f"worker {address} is registered as {worker.role.value}")
            worker.draining, worker.quiet_polls = False, 0
            return worker
        worker = WorkerInfo.connect(address, role)
        self.workers.append(worker)
        log.info("worker %s %s added", role, address)
        await self._poll(worker)
        return worker

    def drain(self, address: str) -> WorkerInfo | None:
        """Stop routing new requests to the worker at `address`; None if unknown."""
        worker = self.find(address)
        if worker is not None and not worker.draining:
            log.info("worker %s %s draining: %d calls in flight", worker.role, address,
                     worker.inflight)  # fmt: skip
            worker.draining, worker.quiet_polls = True, 0
        return worker

    async def remove(self, address: str, timeout_s: float = 30.0) -> bool | None:
        """Drain the worker at `address`, wait up to `timeout_s` seconds for it to be idle,
        then drop it and close its channel. True if it was idle, False if the wait timed out,
        None if no such worker."""
        worker = self.drain(address)
        if worker is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while worker.quiet_polls < 2 and loop.time() < deadline:
            await asyncio.sleep(min(self.poll_interval_s / 2, 0.1))
        idle = worker.quiet_polls >= 2
        if worker in self.workers:
            self.workers.remove(worker)
            await worker.channel.close()
            log.info("worker %s %s removed (%s)", worker.role, address,
                     "drained" if idle else f"not idle after {timeout_s:.0f} s")  # fmt: skip
        return idle

    @property
    def block_size(self) -> int | None:
        """Tokens per KV block of the healthy workers (the first one's), None if unknown."""
        return next((w.block_size for w in self.workers if w.healthy and w.block_size), None)

    @property
    def max_model_len(self) -> int | None:
        """The smallest context (tokens) among healthy workers, None if none reports one."""
        lens = [w.load.max_model_len for w in self.workers if w.healthy and w.load is not None]
        return min((n for n in lens if n > 0), default=None)

    async def start(self) -> None:
        """Poll once (so routing can start informed), then keep polling in the background."""
        await self.poll_once()
        self._task = asyncio.create_task(self._poll_forever(), name="worker-registry-poll")

    async def close(self) -> None:
        """Stop polling and close every channel."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(w.channel.close() for w in self.workers), return_exceptions=True)

    async def poll_once(self) -> None:
        """Refresh every worker's health and load, concurrently."""
        await asyncio.gather(*(self._poll(w) for w in self.workers))

    def mark_unhealthy(self, worker: WorkerInfo, reason: str) -> None:
        """Skip `worker` until its next successful poll (e.g. after a failed RPC)."""
        if worker.healthy:
            log.warning("worker %s %s is unhealthy: %s", worker.role, worker.address, reason)
        worker.healthy = False
        worker.last_error = reason

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll_once()
            except Exception:  # the loop must outlive any one bad answer
                log.exception("worker poll failed")

    async def _poll(self, worker: WorkerInfo) -> None:
        await self._poll_answer(worker)
        if worker.draining:  # a dead worker has nothing left to finish either
            quiet = worker.is_idle or (not worker.healthy and worker.inflight == 0)
            worker.quiet_polls = worker.quiet_polls + 1 if quiet else 0

    async def _poll_answer(self, worker: WorkerInfo) -> None:
        try:
            health, load = await asyncio.gather(
                health_pb2_grpc.HealthStub(worker.channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=self.poll_timeout_s
                ),
                worker.stub.GetLoad(common_pb2.LoadRequest(), timeout=self.poll_timeout_s),
            )
        except grpc.RpcError as error:
            code, details = rpc_status(error)
            self.mark_unhealthy(worker, f"{code.name if code else 'error'}: {details or ''}")
            return
        problem = self._check(worker, health, load)
        if problem:
            self.mark_unhealthy(worker, problem)
            return
        if not worker.healthy:
            log.info("worker %s %s is healthy", worker.role, worker.address)
        worker.load, worker.assigned_since_poll = load, 0
        worker.healthy, worker.last_error = True, ""

    def _check(
        self, worker: WorkerInfo, health: health_pb2.HealthCheckResponse, load: common_pb2.Load
    ) -> str:
        """Why this answer makes the worker unusable ("" if it does not)."""
        if health.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)
            return f"health status {status}"
        if load.role and load.role != worker.role:
            return f"it reports role {load.role!r}, but was given as {worker.role.value!r}"
        if load.model and load.model not in (self.served_model_name, *self._warned_models):
            self._warned_models.add(load.model)
            log.warning(
                "worker %s serves model %r, the router %r: prefix hashes will not match",
                worker.address,
                load.model,
                self.served_model_name,
            )
        return ""
