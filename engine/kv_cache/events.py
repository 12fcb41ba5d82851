"""KV cache events: what a worker stores and evicts, for the cluster's prefix index.

The block pool emits them in order with gap-free sequence numbers; whoever hosts the engine
drains them (the services publish them with the worker's id and epoch). Applying the stream in
order to an empty set rebuilds exactly the pool's set of cached block hashes.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache.hashing import BlockHash


@dataclass(frozen=True, slots=True)
class BlockStored:
    """`block_hashes` (a chain, in order) now hold KV; the first one's parent is `parent_hash`.

    `token_ids` (all blocks' tokens concatenated) is included when the engine is asked to.
    """

    seq: int
    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash | None
    block_size: int
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """`block_hashes` were evicted."""

    seq: int
    block_hashes: tuple[BlockHash, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The whole prefix cache was reset."""

    seq: int


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventLog:
    """Buffers events with consecutive sequence numbers until drained."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.next_seq = 0
        self._pending: list[KVEvent] = []

    def stored(
        self,
        hashes: tuple[BlockHash, ...],
        parent: BlockHash | None,
        block_size: int,
        token_ids: tuple[int, ...] | None,
    ) -> None:
        if self.enabled and hashes:
            self._pending.append(BlockStored(self._seq(), hashes, parent, block_size, token_ids))

    def removed(self, hashes: tuple[BlockHash, ...]) -> None:
        if self.enabled and hashes:
            self._pending.append(BlockRemoved(self._seq(), hashes))

    def cleared(self) -> None:
        if self.enabled:
            self._pending.append(AllBlocksCleared(self._seq()))

    def drain(self) -> list[KVEvent]:
        """Take every event emitted since the last drain, in order."""
        events, self._pending = self._pending, []
        return events

    def _seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1


def replay(events: list[KVEvent], into: set[BlockHash] | None = None) -> set[BlockHash]:
    """Apply events in order to a set of cached hashes (an index's view of one worker)."""
    cached = set() if into is None else into
    for event in events:
        if isinstance(event, BlockStored):
            cached.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            cached.difference_update(event.block_hashes)
        else:
            cached.clear()
    return cached
