"""A worker's KV-event publisher: drains its engine's events and sends them to the index.

Runs as an asyncio task beside the worker's gRPC server, off the model's critical path: every
`interval_s` it takes the events the engine buffered (one call on the engine thread) and sends
them as one batch; when idle it still sends an empty batch (a heartbeat) every `ttl_s / 3`. It
sends a full snapshot of the cached block set at start (a new epoch), whenever the index asks
(a gap), and after any failed send (events may have been lost), so the index converges again as
soon as the store is reachable. Every `ttl_s` it also collects the entries of workers whose
heartbeat lapsed (where the store lets writers: Redis), and `retire()` deletes its own entries
when the worker stops cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence

import grpc

from engine.async_core import AsyncEngineCore
from engine.core import EngineCore
from engine.kv_cache.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from prefix_index.base import IndexUnavailableError, IndexWriter
from proto.baton.v1 import kv_events_pb2, kv_events_pb2_grpc

log = logging.getLogger(__name__)


def event_to_proto(event: KVEvent) -> kv_events_pb2.KVEvent:
    msg = kv_events_pb2.KVEvent(seq=event.seq)
    if isinstance(event, BlockStored):
        msg.stored.block_hashes.extend(event.block_hashes)
        msg.stored.block_size = event.block_size
        if event.parent_hash is not None:
            msg.stored.parent_hash = event.parent_hash
    elif isinstance(event, BlockRemoved):
        msg.removed.block_hashes.extend(event.block_hashes)
    elif isinstance(event, AllBlocksCleared):
        msg.cleared.SetInParent()
    return msg


class RouterIndexWriter(IndexWriter):
    """Sends batches to the in-process index of each router (PrefixIndexService.Publish)."""

    def __init__(self, addresses: Sequence[str], timeout_s: float = 2.0) -> None:
        self._channels = [grpc.aio.insecure_channel(a) for a in addresses]
        self._stubs = [kv_events_pb2_grpc.PrefixIndexServiceStub(c) for c in self._channels]
        self._timeout_s = timeout_s

    async def apply(self, batch: kv_events_pb2.KVEventBatch) -> bool:
        try:
            acks = await asyncio.gather(
                *(stub.Publish(batch, timeout=self._timeout_s) for stub in self._stubs)
            )
        except grpc.aio.AioRpcError as e:
            raise IndexUnavailableError(f"router index: {e.code().name}") from e
        return any(ack.resync for ack in acks)

    async def retire(self, worker_id: str, epoch: str) -> None:
        """A batch with no TTL: the routers' indexes forget this epoch of the worker."""
        leaving = kv_events_pb2.KVEventBatch(worker_id=worker_id, epoch=epoch, ttl_seconds=0)
        await self.apply(leaving)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


class KVEventPublisher:
    """Publishes one worker's KV events under a fresh epoch."""

    def __init__(
        self,
        engine: AsyncEngineCore,
        writer: IndexWriter,
        worker_id: str,
        role: str,
        interval_s: float = 0.05,
        ttl_s: float = 10.0,
    ) -> None:
        self.engine, self.writer = engine, writer
        self.worker_id, self.role = worker_id, role
        self.epoch = uuid.uuid4().hex
        self.interval_s, self.ttl_s = interval_s, ttl_s
        self.needs_snapshot = True
        self.published_batches = 0
        self._last_sent = 0.0
        self._last_collected = time.monotonic()

    async def run(self) -> None:
        """Publish until cancelled."""
        while True:
            try:
                await self.publish_once()
                await self._collect_when_due()
            except IndexUnavailableError as e:
                if not self.needs_snapshot:
                    log.warning("prefix index unavailable (%s): will resync when it is back", e)
                self.needs_snapshot = True
                await asyncio.sleep(min(0.25, self.ttl_s / 3))
            await asyncio.sleep(self.interval_s)

    async def publish_once(self) -> None:
        """Send what is pending (or a snapshot, or a heartbeat when due)."""
        batch = await self.engine.call(self._take_batch)
        idle = not batch.snapshot and not batch.events
        if idle and time.monotonic() - self._last_sent < self.ttl_s / 3:
            return
        self.needs_snapshot = False  # a failure below sets it again
        try:
            resync = await self.writer.apply(batch)
        except IndexUnavailableError:
            self.needs_snapshot = True
            raise
        self._last_sent = time.monotonic()
        self.published_batches += 1
        if resync:
            self.needs_snapshot = True

    async def retire(self, timeout_s: float = 2.0) -> None:
        """Delete this worker's entries from the index (call once `run` is cancelled); a store
        that cannot be reached in `timeout_s` is left to collect them when the heartbeat lapses."""
        try:
            await asyncio.wait_for(self.writer.retire(self.worker_id, self.epoch), timeout_s)
        except (IndexUnavailableError, TimeoutError) as e:
            log.warning("could not retire from the prefix index (%s): entries lapse in %.0f s",
                        e, self.ttl_s)  # fmt: skip

    async def _collect_when_due(self) -> None:
        if time.monotonic() - self._last_collected >= self.ttl_s:
            self._last_collected = time.monotonic()
            gone = await self.writer.collect_lapsed()
            if gone:
                log.info("prefix index: collected the entries of %d lapsed workers", gone)

    def _take_batch(self, core: EngineCore) -> kv_events_pb2.KVEventBatch:
        """On the engine thread: drain events; with a snapshot, the cached set right now."""
        events = core.drain_kv_events()
        batch = kv_events_pb2.KVEventBatch(
            worker_id=self.worker_id,
            epoch=self.epoch,
            role=self.role,
            ttl_seconds=self.ttl_s,
            first_seq=events[0].seq if events else core.events.next_seq,
        )
        if self.needs_snapshot:
            batch.snapshot = True
            batch.first_seq = core.events.next_seq
            batch.snapshot_hashes.extend(core.kv.pool.cached)
        else:
            batch.events.extend(event_to_proto(e) for e in events)
        return batch
