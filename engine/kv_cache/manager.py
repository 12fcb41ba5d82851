"""Per-request block tables on top of the block pool.

A request holding `n` tokens of KV owns `ceil(n / block_size)` blocks, in order::

    tokens : [t0 .. t15][t16 .. t31][t32 t33 _ _ ...]
    blocks :  block 7    block 2     block 9 (partly filled)
"""

from __future__ import annotations

from engine.kv_cache.block_pool import BlockPool, KVCacheBlock
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


class KVCacheManager:
    """Allocates and frees the blocks of each request; the scheduler's only view of the cache."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[KVCacheBlock]] = {}

    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        """Fraction of the cache's blocks in use, in [0, 1]."""
        return self.pool.usage()

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones.

        Returns False, allocating nothing, if the pool lacks the blocks.
        """
        blocks = self._blocks.setdefault(request.request_id, [])
        needed = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size) - len(blocks)
        if needed <= 0:
            return True
        if needed > self.pool.num_free_blocks:
            return False
        blocks.extend(self.pool.allocate(needed))
        return True

    def free(self, request: Request) -> None:
        """Release all of the request's blocks, tail first (so a chain's tail is evicted first)."""
        blocks = self._blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def check_integrity(self, expect_all_free: bool = False) -> None:
        """Pool consistency, plus: every block a request holds is referenced."""
        self.pool.check_integrity(expect_all_free=expect_all_free)
        for blocks in self._blocks.values():
            assert all(b.ref_cnt > 0 for b in blocks), "a request holds a freed block"
        if expect_all_free:
            assert not any(self._blocks.values()), f"requests hold blocks: {list(self._blocks)}"
