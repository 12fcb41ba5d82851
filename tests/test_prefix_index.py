"""The prefix index: in-process and Redis stores, epochs, heartbeats, gaps, the publisher."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_core import AsyncEngineCore
from engine.kv_cache.hashing import hash_prompt_blocks
from prefix_index.base import IndexUnavailableError
from prefix_index.memory import InProcessPrefixIndex
from prefix_index.publisher import KVEventPublisher
from prefix_index.redis_store import RedisIndexWriter, RedisPrefixIndex, connect, namespace
from proto.baton.v1 import kv_events_pb2


def _batch(worker, epoch, first_seq, stored=(), removed=(), snapshot=None, ttl=10.0):
    batch = kv_events_pb2.KVEventBatch(
        worker_id=worker, epoch=epoch, first_seq=first_seq, ttl_seconds=ttl
    )
    if snapshot is not None:
        batch.snapshot = True
        batch.snapshot_hashes.extend(snapshot)
        return batch
    seq = first_seq
    if stored:
        batch.events.add(seq=seq).stored.block_hashes.extend(stored)
        seq += 1
    if removed:
        batch.events.add(seq=seq).removed.block_hashes.extend(removed)
    return batch


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _stores(kind, redis_server):
    """(writer, reader) for one store kind."""
    if kind == "memory":
        index = InProcessPrefixIndex()
        return index, index
    ns = namespace("test", "model")
    return RedisIndexWriter(connect(redis_server.url), ns), RedisPrefixIndex(
        connect(redis_server.url), ns
    )


@pytest.fixture(params=["memory", "redis"])
def store(request):
    redis_server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    return _stores(request.param, redis_server)


def test_match_counts_leading_blocks_per_worker(store):
    writer, reader = store

    async def run():
        assert not await writer.apply(_batch("a", "e1", 0, snapshot=[1, 2, 3]))
        assert not await writer.apply(_batch("b", "e1", 0, snapshot=[1, 2, 9]))
        assert await reader.match([1, 2, 3, 4]) == {"a": 3, "b": 2}
        assert await reader.match([9]) == {"b": 1}
        assert await reader.match([7, 1]) == {}  # stops at the first missing block
        assert await reader.match([1, 9]) == {"a": 1, "b": 2}
        assert not await writer.apply(_batch("a", "e1", 0, stored=[4], removed=[2]))
        assert await reader.match([1, 2, 3, 4]) == {"a": 1, "b": 2}

    asyncio.run(run())


def test_gaps_and_unknown_epochs_ask_for_a_snapshot(store):
    writer, reader = store

    async def run():
        await writer.apply(_batch("a", "e1", 0, snapshot=[1]))
        assert await writer.apply(_batch("a", "e1", 5, stored=[2]))  # seq 0..4 missed: gap
        assert await reader.match([1, 2]) == {"a": 1}  # the gap's batch was not applied
        assert not await writer.apply(_batch("a", "e1", 0, stored=[2]))
        assert await writer.apply(_batch("a", "e2", 0, stored=[3]))  # restarted, no snapshot
        assert await reader.match([1]) == {}  # the old epoch's entries are gone
        assert not await writer.apply(_batch("a", "e2", 0, snapshot=[1, 3]))
        assert await reader.match([1, 3]) == {"a": 2}

    asyncio.run(run())


def test_drop_worker(store):
    writer, reader = store

    async def run():
        await writer.apply(_batch("a", "e1", 0, snapshot=[1, 2]))
        await writer.apply(_batch("b", "e1", 0, snapshot=[1]))
        await reader.drop_worker("a")
        assert await reader.match([1, 2]) == {"b": 1}

    asyncio.run(run())


def test_heartbeat_expiry_in_process():
    clock = FakeClock()
    index = InProcessPrefixIndex(clock=clock)

    async def run():
        await index.apply(_batch("a", "e1", 0, snapshot=[1], ttl=5))
        await index.apply(_batch("b", "e1", 0, snapshot=[1], ttl=50))
        clock.now += 10
        assert await index.match([1]) == {"b": 1}
        await index.apply(_batch("a", "e1", 0, ttl=5))  # a heartbeat revives it
        assert await index.match([1]) == {"a": 1, "b": 1}

    asyncio.run(run())


def test_heartbeat_expiry_in_redis(redis_server):
    writer, reader = _stores("redis", redis_server)

    async def run():
        await writer.apply(_batch("a", "e1", 0, snapshot=[1], ttl=0.2))
        await writer.apply(_batch("b", "e1", 0, snapshot=[1], ttl=30))
        assert await reader.match([1]) == {"a": 1, "b": 1}
        await asyncio.sleep(0.4)
        assert await reader.match([1]) == {"b": 1}

    asyncio.run(run())


def test_namespaces_do_not_mix(redis_server):
    async def run():
        a = RedisIndexWriter(connect(redis_server.url), namespace("c1", "m"))
        await a.apply(_batch("w", "e", 0, snapshot=[1]))
        other = RedisPrefixIndex(connect(redis_server.url), namespace("c2", "m"))
        assert await other.match([1]) == {}

    asyncio.run(run())


def test_redis_password_and_unavailable(redis_server):
    from bench.local_redis import RedisServer

    secured = RedisServer(password="s3cret")
    try:

        async def run():
            writer = RedisIndexWriter(connect(secured.url), namespace("c", "m"))
            await writer.apply(_batch("w", "e", 0, snapshot=[1]))
            secured.stop()
            with pytest.raises(IndexUnavailableError):
                await writer.apply(_batch("w", "e", 0, stored=[2]))

        asyncio.run(run())
    finally:
        secured.stop()


def _engine(tiny_model, **kw):
    from engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
    from engine.core import EngineCore

    config = EngineConfig(
        ModelConfig.from_pretrained(tiny_model("llama")),
        CacheConfig(num_blocks=kw.get("num_blocks", 32), enable_kv_events=True),
        SchedulerConfig(),
    )
    return AsyncEngineCore(EngineCore(config))


async def _generate(engine, rid, prompt):
    from engine.request import Request
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=2)
    async for _ in engine.generate(Request(rid, prompt, params, 2)):
        pass


def test_publisher_keeps_the_index_equal_to_the_engine(tiny_model, redis_server):
    engine = _engine(tiny_model, num_blocks=12)
    engine.start()
    index = RedisPrefixIndex(connect(redis_server.url), namespace("c", "m"))
    writer = RedisIndexWriter(connect(redis_server.url), namespace("c", "m"))
    publisher = KVEventPublisher(engine, writer, "w1", "prefill", interval_s=0.01)

    async def run():
        task = asyncio.create_task(publisher.run())
        prompts = [[i] * 8 + list(range(20 + i, 60 + i)) for i in range(6)]  # evictions: 12 blocks
        for i, prompt in enumerate(prompts):
            await _generate(engine, f"r{i}", prompt)
        await asyncio.sleep(0.2)
        cached = await engine.call(lambda core: set(core.kv.pool.cached))
        for prompt in prompts:
            hashes = hash_prompt_blocks(prompt, 16, engine.core.kv.extra_keys(_req(prompt)))
            expected = sum(1 for _ in _prefix_in(hashes, cached))
            got = (await index.match(hashes)).get("w1", 0)
            assert got == expected
        # The store loses everything (as after a Redis restart): the publisher resyncs.
        await writer._client.flushall()
        await _generate(engine, "again", prompts[-1])
        await asyncio.sleep(0.3)
        hashes = hash_prompt_blocks(prompts[-1], 16, engine.core.kv.extra_keys(_req(prompts[-1])))
        assert (await index.match(hashes)).get("w1", 0) >= 2
        task.cancel()

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()


def _req(prompt):
    from engine.request import Request
    from engine.sampling_params import SamplingParams

    return Request("x", prompt, SamplingParams(), 1)


def _prefix_in(hashes, cached):
    for h in hashes:
        if h not in cached:
            return
        yield h


def test_restarted_worker_replaces_its_entries(tiny_model):
    index = InProcessPrefixIndex()
    engine = _engine(tiny_model)
    engine.start()

    async def run():
        first = KVEventPublisher(engine, index, "w1", "decode")
        await _generate(engine, "a", list(range(3, 40)))
        await first.publish_once()
        assert index.num_blocks("w1") == 2
        await engine.call(lambda core: core.reset_prefix_cache())
        restarted = KVEventPublisher(engine, index, "w1", "decode")  # a new epoch
        await first.publish_once()
        assert index.num_blocks("w1") == 0  # the old epoch saw the clear
        await restarted.publish_once()  # snapshot under the new epoch
        assert await first.writer.apply(_batch("w1", first.epoch, 99, stored=[5]))

    try:
        asyncio.run(run())
    finally:
        engine.shutdown()
