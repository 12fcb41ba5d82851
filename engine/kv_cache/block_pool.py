"""The block pool: every KV block of the cache, a free queue and reference counts.

A block holds `block_size` tokens of K and V for every layer. Requests hold references to
blocks; a block whose count drops to zero goes back to the free queue. The queue is an
intrusive doubly linked list, so allocating, freeing and (for prefix caching) taking a block out
of the middle are all O(1) and allocate nothing per block::

    head <-> b7 <-> b2 <-> b9 <-> tail      popleft() takes b7; append(b) puts b at the tail
"""

from __future__ import annotations

from collections.abc import Iterable


class KVCacheBlock:
    """One block of the paged cache. `ref_cnt` counts the requests using it."""

    __slots__ = ("block_id", "ref_cnt", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt})"


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

    def __iter__(self):
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    """Owns all `num_blocks` blocks; hands them out and takes them back by reference count."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, n: int) -> list[KVCacheBlock]:
        """Take `n` free blocks (ref count 1 each). The caller checks `num_free_blocks` first."""
        if n > self.free_queue.num_free:
            raise ValueError(f"cannot allocate {n} blocks: {self.free_queue.num_free} free")
        blocks = [self.free_queue.popleft() for _ in range(n)]
        for block in blocks:
            block.ref_cnt = 1
        return blocks

    def free(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching zero become free, in order."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def check_integrity(self, expect_all_free: bool = False) -> None:
        """Raise AssertionError if the queue and the counts disagree (or, if asked, a block leaked).

        Every block is either in the free queue with ref count 0, or out of it with count > 0.
        """
        queued = [b.block_id for b in self.free_queue]
        assert len(queued) == len(set(queued)) == self.free_queue.num_free, "free queue corrupt"
        in_queue = set(queued)
        for block in self.blocks:
            if block.block_id in in_queue:
                assert block.ref_cnt == 0, f"{block} is free but referenced"
            else:
                assert block.ref_cnt > 0, f"{block} is neither free nor referenced (leaked)"
        if expect_all_free:
            used = [b.block_id for b in self.blocks if b.ref_cnt]
            assert not used, f"blocks still referenced: {used[:16]}"
