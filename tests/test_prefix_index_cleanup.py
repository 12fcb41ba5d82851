"""A worker's prefix-index entries leave with it: deleted when it stops cleanly, collected once
its heartbeat lapses when it was killed (real worker processes, a real redis-server)."""

from __future__ import annotations

import asyncio
import signal
import time
from concurrent import futures

import grpc
import pytest
import redis

from engine.sampling_params import SamplingParams
from prefix_index.memory import InProcessPrefixIndex
from prefix_index.redis_store import RedisIndexWriter, RedisPrefixIndex, connect, namespace
from proto.baton.v1 import kv_events_pb2, worker_pb2, worker_pb2_grpc
from proto.convert import params_to_proto
from tests.workers import WorkerProcess

TTL_S = 1.0  # the workers' heartbeat TTL here (--index-ttl)
ROUNDS, AT_ONCE = 5, 4  # 20 workers, 4 at a time


def _snapshot(worker: str, epoch: str, hashes, ttl: float = 10.0) -> kv_events_pb2.KVEventBatch:
    batch = kv_events_pb2.KVEventBatch(worker_id=worker, epoch=epoch, ttl_seconds=ttl)
    batch.snapshot = True
    batch.snapshot_hashes.extend(hashes)
    return batch


def _keys(url: str, ns: str) -> set[str]:
    client = redis.Redis.from_url(url)
    try:
        return {key.decode() for key in client.scan_iter(f"{ns}:*")}
    finally:
        client.close()


def test_retire_and_collect_in_redis(redis_server) -> None:
    ns = namespace("cleanup", "model")

    async def run() -> None:
        writer = RedisIndexWriter(connect(redis_server.url), ns)
        reader = RedisPrefixIndex(connect(redis_server.url), ns)
        await writer.apply(_snapshot("a", "e1", [1, 2]))
        await writer.apply(_snapshot("b", "e1", [1], ttl=0.2))
        await writer.apply(_snapshot("c", "e2", [3]))
        await writer.retire("a", "old-epoch")  # a stale process: a's entries stay
        assert await reader.match([1, 2]) == {"a": 2, "b": 1}
        await writer.retire("a", "e1")
        assert not any(key.endswith(":a") or ":a:" in key for key in _keys(redis_server.url, ns))
        await asyncio.sleep(0.3)  # b's heartbeat lapses
        assert await reader.collect_lapsed() == 1
        assert _keys(redis_server.url, ns) == {
            f"{ns}:workers", f"{ns}:w:c", f"{ns}:ws:c:e2", f"{ns}:alive:c"
        }
        await reader.drop_worker("c")
        assert _keys(redis_server.url, ns) == set()
        heartbeat = kv_events_pb2.KVEventBatch(worker_id="b", epoch="e1", ttl_seconds=10)
        assert await writer.apply(heartbeat) is True  # b is back: asked for a snapshot
        await writer.close()
        await reader.close()

    asyncio.run(run())


def test_retire_and_collect_in_process() -> None:
    now = [100.0]
    index = InProcessPrefixIndex(clock=lambda: now[0])

    async def run() -> None:
        await index.apply(_snapshot("a", "e1", [1, 2]))
        await index.apply(_snapshot("b", "e1", [1], ttl=1))
        leaving = kv_events_pb2.KVEventBatch(worker_id="a", epoch="e1", ttl_seconds=0)
        assert not await index.apply(leaving)  # what RouterIndexWriter.retire sends
        assert index.worker_ids() == {"b"}
        now[0] += 2
        assert await index.collect_lapsed() == 1
        assert index.worker_ids() == set() and await index.match([1]) == {}

    asyncio.run(run())


def _cache_a_prompt(address: str, rid: str) -> None:
    """One short request, so the worker holds (and publishes) a few cached blocks."""
    request = worker_pb2.WorkerRequest(
        request_id=rid, prompt_token_ids=list(range(10, 80)),
        params=params_to_proto(SamplingParams(max_tokens=1, temperature=0)),
    )  # fmt: skip
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.ColocatedWorkerStub(channel)
        assert list(stub.Generate(request, timeout=60))


@pytest.mark.slow
def test_twenty_workers_started_and_stopped_leave_nothing(tiny_model, redis_server) -> None:
    model_dir = tiny_model("qwen2")
    ns = namespace("default", model_dir.name)
    flags = ("--role", "colocated", "--num-kv-blocks", "64", "--num-threads", "1",
             "--index-redis-url", redis_server.url, "--index-ttl", str(TTL_S))  # fmt: skip
    survivor = WorkerProcess("decode_service", model_dir, *flags)  # its publisher collects
    seen: set[str] = set()
    try:
        for round_ in range(ROUNDS):
            with futures.ThreadPoolExecutor(AT_ONCE) as pool:
                batch = list(pool.map(
                    lambda _: WorkerProcess("decode_service", model_dir, *flags), range(AT_ONCE)
                ))  # fmt: skip
            for i, worker in enumerate(batch):
                _cache_a_prompt(worker.address, f"r{round_}-{i}")
                seen.add(worker.address)
            published = {f"{ns}:w:{w.address}" for w in batch}
            _wait_for(lambda: published <= _keys(redis_server.url, ns), 10)  # noqa: B023
            for i, worker in enumerate(batch):  # half stop cleanly, half are killed
                if i % 2:
                    worker.proc.send_signal(signal.SIGKILL)
                    worker.proc.wait()
                else:
                    worker.stop()
        assert len(seen) == ROUNDS * AT_ONCE

        def only_the_survivor() -> bool:
            keys = _keys(redis_server.url, ns)
            return not any(address in key for key in keys for address in seen)

        _wait_for(only_the_survivor, 4 * TTL_S + 5)
        assert f"{ns}:alive:{survivor.address}" in _keys(redis_server.url, ns)
    finally:
        survivor.stop()
    assert _keys(redis_server.url, ns) == set()  # its clean stop took its own entries


def _wait_for(condition, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)
