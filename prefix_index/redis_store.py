"""The prefix index in Redis: shared by every router and written by every worker.

Keys, under a namespace `baton:{cluster}:{model}` (so clusters and models never mix)::

    {ns}:b:{hash}            HASH  worker_id -> epoch      who holds this block
    {ns}:w:{worker_id}       HASH  epoch, next_seq         the worker's published position
    {ns}:ws:{worker}:{epoch} SET   block hashes            for clearing a worker's entries
    {ns}:alive:{worker_id}   STRING epoch, with a TTL      the heartbeat

A block entry counts only while the worker's heartbeat key holds the same epoch, so entries of a
dead or restarted worker are never returned. Applying a batch and matching a prompt are each one
server-side Lua script: one round trip whatever the prompt length. (Single Redis instance; a
Redis Cluster would need the keys in one hash slot.)
"""

from __future__ import annotations

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
local function clear(old)
  local skey = ns .. ':ws:' .. wid .. ':' .. old
  for _, h in ipairs(redis.call('SMEMBERS', skey)) do redis.call('HDEL', ns .. ':b:' .. h, wid) end
  redis.call('DEL', skey)
end
if snapshot then
  if cur_epoch then clear(cur_epoch) end
elseif cur_epoch ~= epoch then
  if cur_epoch then clear(cur_epoch); redis.call('DEL', wkey) end
  return 1
elseif cur_next ~= first_seq then
  return 1
end
local skey = ns .. ':ws:' .. wid .. ':' .. epoch
local i = 8
while i <= #ARGV do
  local op, n = ARGV[i], tonumber(ARGV[i + 1])
  if op == 'C' then
    clear(epoch)
  end
  for j = i + 2, i + 1 + n do
    local h = ARGV[j]
    if op == 'S' then
      redis.call('HSET', ns .. ':b:' .. h, wid, epoch); redis.call('SADD', skey, h)
    else
      redis.call('HDEL', ns .. ':b:' .. h, wid); redis.call('SREM', skey, h)
    end
  end
  i = i + 2 + n
end
redis.call('HSET', wkey, 'epoch', epoch, 'next_seq', next_seq)
redis.call('SET', ns .. ':alive:' .. wid, epoch, 'PX', ttl_ms)
return 0
"""

MATCH_SCRIPT = """
local ns = ARGV[1]
local alive = {}
local function is_alive(w, e)
  local a = alive[w]
  if a == nil then a = redis.call('GET', ns .. ':alive:' .. w) or false; alive[w] = a end
  return a == e
end
local active, counts = nil, {}
for i = 2, #ARGV do
  local entries = redis.call('HGETALL', ns .. ':b:' .. ARGV[i])
  local holders, any = {}, false
  for j = 1, #entries, 2 do
    local w, e = entries[j], entries[j + 1]
    if (active == nil or active[w]) and is_alive(w, e) then
      holders[w] = true; counts[w] = i - 1; any = true
    end
  end
  if not any then break end
  active = holders
end
local out = {}
for w, c in pairs(counts) do table.insert(out, w); table.insert(out, c) end
return out
"""


def namespace(cluster: str, model: str) -> str:
    """The key prefix for one cluster serving one model."""
    return f"baton:{cluster}:{model}"


def _encode_ops(batch: kv_events_pb2.KVEventBatch) -> list[str]:
    """Events (or a snapshot's hashes) as the script's flat op list: op, count, hashes..."""
    if batch.snapshot:
        return ["S", str(len(batch.snapshot_hashes)), *map(str, batch.snapshot_hashes)]
    ops: list[str] = []
    for event in batch.events:
        kind = event.WhichOneof("kind")
        if kind == "stored":
            ops += ["S", str(len(event.stored.block_hashes)), *map(str, event.stored.block_hashes)]
        elif kind == "removed":
            hashes = event.removed.block_hashes
            ops += ["R", str(len(hashes)), *map(str, hashes)]
        else:
            ops += ["C", "0"]
    return ops


class RedisIndexWriter(IndexWriter):
    """A worker's side: applies its batches atomically (sequence check included)."""

    def __init__(self, client: aioredis.Redis, ns: str) -> None:
        self._client, self._ns = client, ns
        self._script = client.register_script(APPLY_SCRIPT)

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

    async def close(self) -> None:
        await self._client.aclose()


class RedisPrefixIndex(PrefixIndex):
    """A router's side: one script call per match."""

    def __init__(self, client: aioredis.Redis, ns: str) -> None:
        self._client, self._ns = client, ns
        self._script = client.register_script(MATCH_SCRIPT)

    async def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        if not block_hashes:
            return {}
        try:
            flat = await self._script(args=[self._ns, *map(str, block_hashes)])
        except (RedisError, OSError) as e:
            raise IndexUnavailableError(f"redis: {e}") from e
        return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    async def drop_worker(self, worker_id: str) -> None:
        try:
            await self._client.delete(f"{self._ns}:alive:{worker_id}")
        except (RedisError, OSError) as e:
            raise IndexUnavailableError(f"redis: {e}") from e

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def connect(url: str, **kwargs) -> aioredis.Redis:
    """A client for `redis://` or `rediss://` URLs (password in the URL), short timeouts."""
    kwargs.setdefault("socket_timeout", 1.0)
    kwargs.setdefault("socket_connect_timeout", 1.0)
    return aioredis.Redis.from_url(url, **kwargs)
