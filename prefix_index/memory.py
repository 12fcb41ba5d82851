"""The in-process prefix index: one router on one machine, fed by workers over gRPC."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from prefix_index.base import IndexWriter, PrefixIndex
from proto.baton.v1 import kv_events_pb2


@dataclass(slots=True)
class _WorkerEntries:
    epoch: str
    next_seq: int
    expires_at: float  # time.monotonic() seconds
    hashes: set[int] = field(default_factory=set)


class InProcessPrefixIndex(PrefixIndex, IndexWriter):
    """Block hash -> workers, plus each worker's epoch, sequence and heartbeat deadline."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._holders: dict[int, set[str]] = {}
        self._workers: dict[str, _WorkerEntries] = {}

    async def apply(self, batch: kv_events_pb2.KVEventBatch) -> bool:
        entries = self._workers.get(batch.worker_id)
        if batch.ttl_seconds <= 0:  # a worker leaving (RouterIndexWriter.retire)
            if entries is not None and entries.epoch == batch.epoch:
                self._forget(batch.worker_id)
            return False
        if batch.snapshot:
            entries = self._replace(batch)
        elif entries is None or entries.epoch != batch.epoch:
            if entries is not None:  # restarted: its old blocks are gone
                self._forget(batch.worker_id)
            return True
        elif batch.events and batch.first_seq != entries.next_seq:
            return True  # a gap: keep serving old entries until the snapshot replaces them
        for event in batch.events:
            self._apply_event(batch.worker_id, entries, event)
            entries.next_seq = event.seq + 1
        entries.expires_at = self._clock() + batch.ttl_seconds
        return False

    async def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        now = self._clock()
        counts: dict[str, int] = {}
        active: set[str] | None = None
        for i, block_hash in enumerate(block_hashes):
            holders = {
                w for w in self._holders.get(block_hash, ()) if self._workers[w].expires_at > now
            }
            if active is not None:
                holders &= active
            if not holders:
                break
            for worker in holders:
                counts[worker] = i + 1
            active = holders
        return counts

    async def drop_worker(self, worker_id: str) -> None:
        self._forget(worker_id)

    async def retire(self, worker_id: str, epoch: str) -> None:
        entries = self._workers.get(worker_id)
        if entries is not None and entries.epoch == epoch:
            self._forget(worker_id)

    async def collect_lapsed(self) -> int:
        now = self._clock()
        lapsed = [w for w, entries in self._workers.items() if entries.expires_at <= now]
        for worker_id in lapsed:
            self._forget(worker_id)
        return len(lapsed)

    def worker_ids(self) -> set[str]:
        """Every worker with entries (live or lapsed and not yet collected)."""
        return set(self._workers)

    def num_blocks(self, worker_id: str) -> int:
        entries = self._workers.get(worker_id)
        return len(entries.hashes) if entries else 0

    def _replace(self, batch: kv_events_pb2.KVEventBatch) -> _WorkerEntries:
        self._forget(batch.worker_id)
        entries = _WorkerEntries(batch.epoch, batch.first_seq, 0.0)
        self._workers[batch.worker_id] = entries
        for block_hash in batch.snapshot_hashes:
            self._add(batch.worker_id, entries, block_hash)
        return entries

    def _apply_event(self, worker: str, entries: _WorkerEntries, event: kv_events_pb2.KVEvent):
        kind = event.WhichOneof("kind")
        if kind == "stored":
            for block_hash in event.stored.block_hashes:
                self._add(worker, entries, block_hash)
        elif kind == "removed":
            for block_hash in event.removed.block_hashes:
                self._remove(worker, entries, block_hash)
        elif kind == "cleared":
            for block_hash in list(entries.hashes):
                self._remove(worker, entries, block_hash)

    def _add(self, worker: str, entries: _WorkerEntries, block_hash: int) -> None:
        entries.hashes.add(block_hash)
        self._holders.setdefault(block_hash, set()).add(worker)

    def _remove(self, worker: str, entries: _WorkerEntries, block_hash: int) -> None:
        entries.hashes.discard(block_hash)
        holders = self._holders.get(block_hash)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self._holders[block_hash]

    def _forget(self, worker_id: str) -> None:
        entries = self._workers.pop(worker_id, None)
        if entries is not None:
            for block_hash in list(entries.hashes):
                self._remove(worker_id, entries, block_hash)
