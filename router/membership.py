"""Workers joining and leaving a running router, and their prefix-index entries leaving too.

Three sources call it: the admin HTTP API (`router.admin`, what `baton serve --autoscale`
uses), Kubernetes EndpointSlices (`router.discovery`), and nothing else: workers given on the
command line are simply the first members. A worker that leaves is drained first
(`WorkerRegistry.remove`), then its entries go from the prefix index. The index's entries of
workers whose heartbeat lapsed are collected every `collect_interval_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from prefix_index.base import IndexUnavailableError, PrefixIndex
from router.registry import WorkerRegistry
from router.workers import Role, WorkerInfo

log = logging.getLogger(__name__)


class Membership:
    """Adds and removes the registry's workers; keeps the prefix index clean."""

    def __init__(
        self,
        registry: WorkerRegistry,
        index: PrefixIndex | None,
        drain_timeout_s: float = 30.0,
        collect_interval_s: float = 10.0,
    ) -> None:
        self.registry, self.index = registry, index
        self.drain_timeout_s = drain_timeout_s
        self.collect_interval_s = collect_interval_s
        self._leaving: dict[str, asyncio.Task[bool | None]] = {}
        self._task: asyncio.Task[None] | None = None

    async def add(self, address: str, role: Role) -> WorkerInfo:
        """Register a worker (ValueError if its address has another role)."""
        leaving = self._leaving.pop(address, None)
        if leaving is not None:  # it came back before it was gone: keep it
            leaving.cancel()
        return await self.registry.add(address, role)

    async def remove(self, address: str, timeout_s: float | None = None) -> bool | None:
        """Drain and drop a worker, then its index entries: True once drained, False if it
        was still busy after `timeout_s` (dropped all the same), None if unknown."""
        timeout = self.drain_timeout_s if timeout_s is None else timeout_s
        idle = await self.registry.remove(address, timeout)
        if idle is not None and self.index is not None:
            try:
                await self.index.drop_worker(address)
            except IndexUnavailableError as error:
                log.warning("could not drop %s from the prefix index: %s", address, error)
        return idle

    def remove_later(self, address: str) -> None:
        """`remove` in the background (discovery: the source says it is gone)."""
        if address not in self._leaving:
            task = asyncio.create_task(self.remove(address), name=f"remove {address}")
            self._leaving[address] = task
            task.add_done_callback(lambda t: self._forget_task(address, t))

    def _forget_task(self, address: str, task: asyncio.Task[bool | None]) -> None:
        if self._leaving.get(address) is task:
            del self._leaving[address]

    async def sync(self, role: Role, addresses: Iterable[str]) -> None:
        """Make the registry's `role` workers exactly `addresses`: add the new, remove the
        missing (draining them)."""
        wanted = set(addresses)
        present = {w.address for w in self.registry.configured(role) if not w.draining}
        for address in sorted(wanted - present):
            await self.add(address, role)
        for address in sorted(present - wanted):
            self.registry.drain(address)
            self.remove_later(address)

    async def start(self) -> None:
        """Collect lapsed index entries in the background."""
        if self.index is not None:
            self._task = asyncio.create_task(self._collect_forever(), name="index-collect")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._leaving.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _collect_forever(self) -> None:
        assert self.index is not None
        while True:
            await asyncio.sleep(self.collect_interval_s)
            try:
                gone = await self.index.collect_lapsed()
            except IndexUnavailableError as error:
                log.warning("prefix index collection failed: %s", error)
                continue
            if gone:
                log.info("prefix index: collected the entries of %d lapsed workers", gone)
