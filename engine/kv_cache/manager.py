"""Per-request block tables on top of the block pool, with automatic prefix caching.

A request holding `n` tokens of KV owns `ceil(n / block_size)` blocks, in order::

    tokens : [t0 .. t15][t16 .. t31][t32 t33 _ _ ...]
    blocks :  block 7    block 2     block 9 (partly filled)
    hashes :  h0         h1          (none: only full blocks are hashed)

On admission the scheduler asks `get_computed_blocks` for the longest chain of cached blocks
that starts the request (at most num_tokens - 1 tokens, so the last token is computed for its
logits) and passes them to `allocate_slots`; after each step `cache_blocks` indexes the blocks
that became full.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.kv_cache.block_pool import BlockPool, KVCacheBlock
from engine.kv_cache.events import KVEventLog
from engine.kv_cache.hashing import (
    ROOT_HASH,
    BlockHash,
    ExtraKeys,
    hash_prompt_blocks,
    request_extra_keys,
)
from engine.request import Request

HashFn = Callable[[Sequence[int], int, ExtraKeys, BlockHash, int], list[BlockHash]]


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


@dataclass(slots=True)
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache, and how many of them hit (both in tokens)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Allocates and frees the blocks of each request; the scheduler's only view of the cache."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        model_identity: str = "",
        events: KVEventLog | None = None,
        hash_fn: HashFn = hash_prompt_blocks,
        event_token_ids: bool = False,
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.model_identity = model_identity
        self.events = events or KVEventLog(enabled=False)
        self.pool = BlockPool(num_blocks, self.events)
        self.hash_fn = hash_fn
        self.event_token_ids = event_token_ids
        self.stats = PrefixCacheStats()
        self._blocks: dict[str, list[KVCacheBlock]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same blocks' ids, for the runner
        self._num_cached: dict[str, int] = {}  # leading blocks of a request already indexed

    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        """Fraction of the cache's blocks in use, in [0, 1]."""
        return self.pool.usage()

    def extra_keys(self, request: Request) -> ExtraKeys:
        return request_extra_keys(self.model_identity, request.cache_salt)

    def get_computed_blocks(self, request: Request) -> list[KVCacheBlock]:
        """The cached blocks that start `request` (verified token by token), longest chain."""
        if not self._caches(request):
            return []
        hashes = self._block_hashes(request)
        limit = min(len(hashes), (request.num_tokens - 1) // self.block_size)
        extra, parent, bs = self.extra_keys(request), ROOT_HASH, self.block_size
        hits: list[KVCacheBlock] = []
        for i in range(limit):
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            block = self.pool.lookup(hashes[i], parent, tokens, extra)
            if block is None:
                break
            hits.append(block)
            parent = hashes[i]
        return hits

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed: Sequence[KVCacheBlock] = ()
    ) -> bool:
        """Make room for `num_new_tokens` after the computed ones (and the `computed` hits).

        Returns False, changing nothing, if the pool lacks the blocks.
        """
        rid = request.request_id
        blocks = self._blocks.get(rid)
        if blocks is None:
            blocks = self._blocks[rid] = []
        elif (
            not computed
            and request.num_computed_tokens + num_new_tokens <= len(blocks) * self.block_size
        ):
            return True  # the common decode step: room in the last block
        total = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        needed = cdiv(total, self.block_size) - len(blocks) - len(computed)
        if needed <= 0 and not computed:
            return True
        reclaimed = sum(1 for b in computed if b.ref_cnt == 0)  # hits sitting in the free queue
        if max(needed, 0) + reclaimed > self.pool.num_free_blocks:
            if not blocks:
                del self._blocks[rid]
            return False
        ids = self._block_ids.setdefault(rid, [])
        if computed:
            self.pool.touch(computed)
            blocks.extend(computed)
            ids.extend(b.block_id for b in computed)
            self._num_cached[rid] = len(computed)
        if needed > 0:
            new = self.pool.allocate(needed)
            blocks.extend(new)
            ids.extend(b.block_id for b in new)
        return True

    def cache_blocks(self, request: Request) -> None:
        """Index the request's blocks that are now full of computed KV."""
        rid, bs = request.request_id, self.block_size
        start = self._num_cached.get(rid, 0)
        end = request.num_computed_tokens // bs
        if end <= start or not self._caches(request):
            return
        hashes = self._block_hashes(request)
        blocks, extra = self._blocks[rid], self.extra_keys(request)
        stored: list[BlockHash] = []
        first_parent = hashes[start - 1] if start else ROOT_HASH
        for i in range(start, end):
            parent = hashes[i - 1] if i else ROOT_HASH
            tokens = tuple(request.all_token_ids[i * bs : (i + 1) * bs])
            if self.pool.cache(blocks[i], hashes[i], parent, tokens, extra):
                stored.append(hashes[i])
            else:  # a duplicate elsewhere: emit what we have, restart the run after it
                self._emit_stored(stored, first_parent, request, i - len(stored))
                stored, first_parent = [], hashes[i]
        self._emit_stored(stored, first_parent, request, end - len(stored))
        self._num_cached[rid] = end

    def trim(self, request: Request) -> None:
        """Release the request's blocks past its computed tokens (speculative decoding: the
        slots of rejected drafts), tail first. They hold no cached (hashed) block."""
        rid = request.request_id
        blocks = self._blocks.get(rid)
        keep = cdiv(request.num_computed_tokens, self.block_size)
        if not blocks or len(blocks) <= keep:
            return
        extra = blocks[keep:]
        del blocks[keep:]
        # A new id list, not the old one cut: the CUDA graphs' packed tables skip a row whose
        # list object and length they saw before (engine.cuda_graphs.PackedTables: a list only
        # grows), and a cut list regrown to its old length holds another block at its end.
        self._block_ids[rid] = self._block_ids[rid][:keep]
        self.pool.free(reversed(extra))

    def free(self, request: Request) -> None:
        """Release all of the request's blocks, tail first (so a chain's tail is evicted first)."""
        blocks = self._blocks.pop(request.request_id, None)
        self._block_ids.pop(request.request_id, None)
        self._num_cached.pop(request.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        """Forget all cached blocks; False (nothing done) while any request holds blocks."""
        return self.pool.reset_prefix_cache()

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block ids in order (the manager's own list: do not modify it)."""
        return self._block_ids.get(request_id, [])

    def check_integrity(self, expect_all_free: bool = False) -> None:
        """Pool consistency, plus: every block a request holds is referenced."""
        self.pool.check_integrity(expect_all_free=expect_all_free)
        for blocks in self._blocks.values():
            assert all(b.ref_cnt > 0 for b in blocks), "a request holds a freed block"
        if expect_all_free:
            assert not any(self._blocks.values()), f"requests hold blocks: {list(self._blocks)}"

    def _caches(self, request: Request) -> bool:
        # Prompt logprobs need the logits of every prompt position: no reuse (as vLLM).
        return self.enable_caching and request.params.prompt_logprobs is None

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """The request's full-block hashes, extended as its tokens grow."""
        hashes = request.block_hashes
        if len(hashes) < request.num_tokens // self.block_size:
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.extend(
                self.hash_fn(
                    request.all_token_ids,
                    self.block_size,
                    self.extra_keys(request),
                    parent,
                    len(hashes),
                )
            )
        return hashes

    def _emit_stored(
        self, hashes: list[BlockHash], parent: BlockHash, request: Request, first: int
    ) -> None:
        if not hashes:
            return
        tokens = None
        if self.event_token_ids:
            bs = self.block_size
            tokens = tuple(request.all_token_ids[first * bs : (first + len(hashes)) * bs])
        self.events.stored(tuple(hashes), None if first == 0 else parent, self.block_size, tokens)
