"""The prefix index in Redis: shared by every router and written by every worker.

Keys, under a namespace `baton:{cluster}:{model}` (so clusters and models never mix)::

    {ns}:workers             SET    worker ids that ever published
    {ns}:w:{worker_id}       HASH   epoch, next_seq          the worker's published position
    {ns}:ws:{worker}:{epoch} SET    block hashes the worker holds (8-byte little-endian
                                    strings; the set expires unless refreshed)
    {ns}:alive:{worker_id}   STRING epoch, with a TTL        the heartbeat

A worker's blocks count only while its heartbeat key holds the same epoch, so entries of a dead
or restarted worker are never returned. A worker leaving cleanly deletes all four of its entries
(RETIRE_SCRIPT, `RedisIndexWriter.retire`); those of one that died are collected once its
heartbeat has lapsed (COLLECT_SCRIPT, run by routers and by every worker's publisher), so on
Kubernetes, where each restarted pod has a new address, the keys do not grow without end.

Applying a batch and matching a prompt are each one server-side Lua script: one round trip
whatever the prompt length. A match asks each live worker's set about all of the prompt's
blocks at once (SMISMEMBER) and counts the leading ones: it stops at the first missing block.
Hashes travel packed in one binary argument: a prompt's 512 hashes cost one argument, not 512.
(Single Redis instance; a Redis Cluster would need the keys in one hash slot.)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from prefix_index.base import IndexUnavailableError, IndexWriter, PrefixIndex
from proto.baton.v1 import kv_events_pb2

APPLY_SCRIPT = """
local ns, wid, epoch = ARGV[1], ARGV[2], ARGV[3]
local snapshot, first_seq, ttl_ms = ARGV[4] == '1', tonumber(ARGV[5]), tonumber(ARGV[6])
local next_seq = tonumber(ARGV[7])
local wkey = ns .. ':w:' .. wid
local cur_epoch = redis.call('HGET', wkey, 'epoch')
local cur_next = tonumber(redis.call('HGET', wkey, 'next_seq') or '-1')
if snapshot then
  if cur_epoch then redis.call('DEL', ns .. ':ws:' .. wid .. ':' .. cur_epoch) end
elseif cur_epoch ~= epoch then
  if cur_epoch then
    redis.call('DEL', ns .. ':ws:' .. wid .. ':' .. cur_epoch); redis.call('DEL', wkey)
  end
  return 1
elseif cur_next ~= first_seq then
  return 1
end
local skey = ns .. ':ws:' .. wid .. ':' .. epoch
local function split(blob)
  local out = {}
  for k = 1, #blob, 8 do out[#out + 1] = string.sub(blob, k, k + 7) end
  return out
end
for i = 8, #ARGV, 2 do
  local op, hashes = ARGV[i], split(ARGV[i + 1])
  if op == 'C' then redis.call('DEL', skey) end
  for j = 1, #hashes, 4000 do
    local last = math.min(j + 3999, #hashes)
    if op == 'S' then
      redis.call('SADD', skey, unpack(hashes, j, last))
    elseif op == 'R' then
      redis.call('SREM', skey, unpack(hashes, j, last))
    end
  end
end
redis.call('SADD', ns .. ':workers', wid)
redis.call('HSET', wkey, 'epoch', epoch, 'next_seq', next_seq)
redis.call('SET', ns .. ':alive:' .. wid, epoch, 'PX', ttl_ms)
redis.call('PEXPIRE', skey, ttl_ms * 3)
return 0
"""

MATCH_SCRIPT = """
local ns, blob = ARGV[1], ARGV[2]
local hashes = {}
for k = 1, #blob, 8 do hashes[#hashes + 1] = string.sub(blob, k, k + 7) end
local out = {}
for _, w in ipairs(redis.call('SMEMBERS', ns .. ':workers')) do
  local epoch = redis.call('GET', ns .. ':alive:' .. w)
  if epoch then
    local skey = ns .. ':ws:' .. w .. ':' .. epoch
    local count, done = 0, false
    for j = 1, #hashes, 32 do  -- chunks: a worker without the prefix costs one small call
      local bits = redis.call('SMISMEMBER', skey, unpack(hashes, j, math.min(j + 31, #hashes)))
      for _, bit in ipairs(bits) do
        if bit == 0 then done = true; break end
        count = count + 1
      end
      if done then break end
    end
    if count > 0 then table.insert(out, w); table.insert(out, count) end
  end
end
return out
"""


RETIRE_SCRIPT = """
local ns, wid, epoch = ARGV[1], ARGV[2], ARGV[3]
local wkey = ns .. ':w:' .. wid
local cur_epoch = redis.call('HGET', wkey, 'epoch')
if epoch ~= '' and cur_epoch and cur_epoch ~= epoch then return 0 end  -- a newer process
if cur_epoch then redis.call('DEL', ns .. ':ws:' .. wid .. ':' .. cur_epoch) end
if epoch ~= '' then redis.call('DEL', ns .. ':ws:' .. wid .. ':' .. epoch) end
local alive = redis.call('GET', ns .. ':alive:' .. wid)
if epoch == '' or alive == epoch then redis.call('DEL', ns .. ':alive:' .. wid) end
redis.call('DEL', wkey)
redis.call('SREM', ns .. ':workers', wid)
return 1
"""

COLLECT_SCRIPT = """
local ns, gone = ARGV[1], 0
for _, w in ipairs(redis.call('SMEMBERS', ns .. ':workers')) do
  if redis.call('EXISTS', ns .. ':alive:' .. w) == 0 then
    local wkey = ns .. ':w:' .. w
    local epoch = redis.call('HGET', wkey, 'epoch')
    if epoch then redis.call('DEL', ns .. ':ws:' .. w .. ':' .. epoch) end
    redis.call('DEL', wkey)
    redis.call('SREM', ns .. ':workers', w)
    gone = gone + 1
  end
end
return gone
"""


class _Scripts:
    """The cleanup scripts both sides run, on one client."""

    def __init__(self, client: aioredis.Redis, ns: str) -> None:
        self._ns = ns
        self._retire = client.register_script(RETIRE_SCRIPT)
        self._collect = client.register_script(COLLECT_SCRIPT)

    async def retire(self, worker_id: str, epoch: str) -> None:
        try:
            await self._retire(args=[self._ns, worker_id, epoch])
        except (RedisError, OSError) as e:
            raise IndexUnavailableError(f"redis: {e}") from e

    async def collect_lapsed(self) -> int:
        try:
            return int(await self._collect(args=[self._ns]))
        except (RedisError, OSError) as e:
            raise IndexUnavailableError(f"redis: {e}") from e


def namespace(cluster: str, model: str) -> str:
    """The key prefix for one cluster serving one model."""
    return f"baton:{cluster}:{model}"


def pack_hashes(hashes) -> bytes:
    """Block hashes as one binary string: 8 bytes each, little-endian."""
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def _encode_ops(batch: kv_events_pb2.KVEventBatch) -> list[str | bytes]:
    """Events (or a snapshot's hashes) as the script's op list: op, packed hashes, ..."""
    if batch.snapshot:
        return ["S", pack_hashes(batch.snapshot_hashes)]
    ops: list[str | bytes] = []
    for event in batch.events:
        kind = event.WhichOneof("kind")
        if kind == "stored":
            ops += ["S", pack_hashes(event.stored.block_hashes)]
        elif kind == "removed":
            ops += ["R", pack_hashes(event.removed.block_hashes)]
        else:
            ops += ["C", b""]
    return ops


class RedisIndexWriter(IndexWriter):
    """A worker's side: applies its batches atomically (sequence check included)."""

    def __init__(self, client: aioredis.Redis, ns: str) -> None:
        self._client, self._ns = client, ns
        self._script = client.register_script(APPLY_SCRIPT)
        self._cleanup = _Scripts(client, ns)

    async def apply(self, batch: kv_events_pb2.KVEventBatch) -> bool:
        next_seq = batch.events[-1].seq + 1 if batch.events else batch.first_seq
        args = [
            self._ns,
            batch.worker_id,
            batch.epoch,
            "1" if batch.snapshot else "0",
            batch.first_seq,
            max(1, int(batch.ttl_seconds * 1000)),
            next_seq,
            *_encode_ops(batch),
        ]
        try:
            return bool(await self._script(args=args))
        except (RedisError, OSError) as e:
            raise IndexUnavailableError(f"redis: {e}") from e

    async def retire(self, worker_id: str, epoch: str) -> None:
        await self._cleanup.retire(worker_id, epoch)

    async def collect_lapsed(self) -> int:
        return await self._cleanup.collect_lapsed()

    async def close(self) -> None:
        await self._client.aclose()


class RedisPrefixIndex(PrefixIndex):
    """A router's side: one script call per match."""

    def __init__(self, client: aioredis.Redis, ns: str) -> None:
        self._client, self._ns = client, ns
        self._script = client.register_script(MATCH_SCRIPT)
        self._cleanup = _Scripts(client, ns)

    async def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        if not block_hashes:
            return {}
        try:
            flat = await self._script(args=[self._ns, pack_hashes(block_hashes)])
        except (RedisError, OSError) as e:
            raise IndexUnavailableError(f"redis: {e}") from e
        return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def drop_worker(self, worker_id: str) -> None:
        await self._cleanup.retire(worker_id, "")

    async def collect_lapsed(self) -> int:
        return await self._cleanup.collect_lapsed()

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def connect(url: str, **kwargs) -> aioredis.Redis:
    """A client for `redis://` or `rediss://` URLs (password in the URL), short timeouts."""
    kwargs.setdefault("socket_timeout", 1.0)
    kwargs.setdefault("socket_connect_timeout", 1.0)
    return aioredis.Redis.from_url(url, **kwargs)
