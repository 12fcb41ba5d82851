"""Block pool and KV cache manager: O(1) free queue, reference counts, integrity checks."""

import pytest

from engine.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def test_free_queue_order_and_remove():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert [b.block_id for b in queue] == [0, 1, 2, 3, 4]
    queue.remove(blocks[2])
    assert queue.popleft() is blocks[0]
    queue.append(blocks[0])
    assert [b.block_id for b in queue] == [1, 3, 4, 0]
    assert queue.num_free == 4
    with pytest.raises(ValueError):
        queue.remove(blocks[2])


def test_pool_allocate_free_refcounts():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert [b.ref_cnt for b in a] == [1, 1, 1] and pool.num_free_blocks == 1
    with pytest.raises(ValueError, match="cannot allocate 2 blocks"):
        pool.allocate(2)
    a[0].ref_cnt += 1  # shared by a second request
    pool.free(a)
    assert pool.num_free_blocks == 3
    pool.check_integrity()
    with pytest.raises(AssertionError, match="still referenced"):
        pool.check_integrity(expect_all_free=True)
    pool.free([a[0]])
    pool.check_integrity(expect_all_free=True)
    with pytest.raises(ValueError, match="double free"):
        pool.free([a[0]])


def test_integrity_check_catches_leak():
    pool = BlockPool(3)
    pool.allocate(1)[0].ref_cnt = 0  # dropped without returning it to the queue
    with pytest.raises(AssertionError, match="leaked"):
        pool.check_integrity()


def _request(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), SamplingParams(max_tokens=4), max_tokens=4)


def test_manager_allocates_by_block_and_frees_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_caching=False)
    req = _request("a", 9)
    assert kv.allocate_slots(req, 9)
    assert len(kv.block_ids("a")) == 3  # ceil(9 / 4)
    req.num_computed_tokens = 9
    assert kv.allocate_slots(req, 3)  # tokens 9..11 still fit in block 3
    assert len(kv.block_ids("a")) == 3
    assert kv.allocate_slots(req, 4)
    assert len(kv.block_ids("a")) == 4
    big = _request("b", 12)
    assert not kv.allocate_slots(big, 12)  # needs 3, 2 free: nothing allocated
    assert kv.num_free_blocks() == 2
    held = kv.block_ids("a")
    kv.free(req)
    assert [b.block_id for b in kv.pool.free_queue][-4:] == held[::-1]
    kv.check_integrity(expect_all_free=True)
