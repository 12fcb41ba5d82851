"""The block pool: every KV block of the cache, a free queue, reference counts, prefix cache.

A block holds `block_size` tokens of K and V for every layer. Requests hold references to
blocks; a block whose count drops to zero goes back to the tail of the free queue but keeps its
contents and hash, so a later request with the same prefix can take it back (a cache hit).
Allocation takes from the head: the least recently freed block is evicted first. The queue is
an intrusive doubly linked list, so allocating, freeing and taking a hit block out of the middle
are all O(1) and allocate nothing per block::

    head <-> b7 <-> b2 <-> b9 <-> tail      popleft() takes b7; append(b) puts b at the tail
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from engine.kv_cache.events import KVEventLog
from engine.kv_cache.hashing import BlockHash, ExtraKeys


class KVCacheBlock:
    """One block of the paged cache. `ref_cnt` counts the requests using it.

    A full block whose KV is known carries `block_hash` plus what the hash covers (parent hash,
    token ids, extra keys), so a hit is verified exactly and a hash collision is never served.
    """

    __slots__ = (
        "block_id",
        "ref_cnt",
        "prev_free",
        "next_free",
        "block_hash",
        "parent_hash",
        "token_ids",
        "extra_keys",
    )

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None
        self.block_hash: BlockHash | None = None
        self.parent_hash: BlockHash | None = None
        self.token_ids: tuple[int, ...] = ()
        self.extra_keys: ExtraKeys = ()

    def matches(self, parent: BlockHash, token_ids: tuple[int, ...], extra: ExtraKeys) -> bool:
        same_chain = self.parent_hash == parent and self.extra_keys == extra
        return same_chain and self.token_ids == token_ids

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks with O(1) popleft, append and remove."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels: no None checks on the hot path
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("no free block")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free += 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    """Owns all `num_blocks` blocks; hands them out, takes them back, and indexes cached ones."""

    def __init__(self, num_blocks: int, events: KVEventLog | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVCacheBlock] = {}
        self.events = events or KVEventLog(enabled=False)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds (cached-but-unreferenced ones included: they are evictable)."""
        return self.free_queue.num_free

    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVCacheBlock]:
        """Take `n` free blocks (ref count 1 each), evicting cached contents least recent first."""
        if n > self.free_queue.num_free:
            raise ValueError(f"cannot allocate {n} blocks: {self.free_queue.num_free} free")
        blocks = [self.free_queue.popleft() for _ in range(n)]
        evicted = []
        for block in blocks:
            block.ref_cnt = 1
            if block.block_hash is not None:
                evicted.append(block.block_hash)
                self._uncache(block)
        self.events.removed(tuple(evicted))
        return blocks

    def free(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero become free, in order."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def lookup(
        self, block_hash: BlockHash, parent: BlockHash, token_ids: tuple[int, ...], extra: ExtraKeys
    ) -> KVCacheBlock | None:
        """The cached block for this exact (parent, tokens, extra keys), or None."""
        block = self.cached.get(block_hash)
        if block is None or not block.matches(parent, token_ids, extra):
            return None
        return block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference to cache-hit blocks, pulling unreferenced ones off the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache(
        self,
        block: KVCacheBlock,
        block_hash: BlockHash,
        parent: BlockHash,
        token_ids: tuple[int, ...],
        extra: ExtraKeys,
    ) -> bool:
        """Index a newly full block; False if another block already holds this hash."""
        if block.block_hash is not None or block_hash in self.cached:
            return False
        block.block_hash, block.parent_hash = block_hash, parent
        block.token_ids, block.extra_keys = token_ids, extra
        self.cached[block_hash] = block
        return True

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in list(self.cached.values()):
            self._uncache(block)
        self.events.cleared()
        return True

    def _uncache(self, block: KVCacheBlock) -> None:
        assert block.block_hash is not None
        del self.cached[block.block_hash]
        block.block_hash = block.parent_hash = None
        block.token_ids, block.extra_keys = (), ()

    def check_integrity(self, expect_all_free: bool = False) -> None:
        """Raise AssertionError if the queue, the counts and the cache index disagree.

        Every block is either in the free queue with ref count 0, or out of it with count > 0;
        every cached block is indexed under its own hash. With `expect_all_free`, also that no
        block is still referenced (nothing leaked).
        """
        queued = [b.block_id for b in self.free_queue]
        assert len(queued) == len(set(queued)) == self.free_queue.num_free, "free queue corrupt"
        in_queue = set(queued)
        for block in self.blocks:
            if block.block_id in in_queue:
                assert block.ref_cnt == 0, f"{block} is free but referenced"
            else:
                assert block.ref_cnt > 0, f"{block} is neither free nor referenced (leaked)"
            if block.block_hash is not None:
                assert self.cached.get(block.block_hash) is block, f"{block} not indexed"
        assert all(b.block_hash == h for h, b in self.cached.items()), "cache index corrupt"
        if expect_all_free:
            used = [b.block_id for b in self.blocks if b.ref_cnt]
            assert not used, f"blocks still referenced: {used[:16]}"
