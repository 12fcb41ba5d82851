"""The one block-hash function of the project, shared by the workers' caches and the router.

A block's hash chains its parent's, so equal hashes mean equal prefixes (up to collisions,
which the cache guards against by comparing token ids)::

    h0 = H(ROOT, tokens[0:16], extra)   h1 = H(h0, tokens[16:32], extra)   ...

Only full blocks are hashed. `extra_keys` carry what else must match for KV to be reusable: the
model identity and the request's cache salt (tenants with different salts never share blocks).
The encoding is canonical (fixed-width little-endian integers, length-prefixed UTF-8 strings)
and the hash is XXH3-64 with a fixed seed: the same in every process and on every node,
independent of PYTHONHASHSEED, and fast (an 8,192-token prompt hashes in about 0.2 ms, which
matters on the router's per-request path). It is not a cryptographic hash, and need not be:
every cache hit is verified against the block's token ids, parent and extra keys, so a
collision (accidental or crafted) can never serve another prompt's or another tenant's KV.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from typing import NewType

from xxhash import xxh3_64_intdigest

BlockHash = NewType("BlockHash", int)  # unsigned 64-bit
ExtraKeys = tuple[str, ...]

HASH_SEED = 0x6261746F6E2D7631  # "baton-v1"
ROOT_HASH = BlockHash(0)  # the parent of a prompt's first block


def hash_block(
    parent_hash: BlockHash, block_token_ids: Sequence[int], extra_keys: ExtraKeys = ()
) -> BlockHash:
    """64-bit hash of one full block given its parent's hash."""
    return _hash(parent_hash, _token_bytes(block_token_ids), _extra_bytes(extra_keys))


def hash_prompt_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: ExtraKeys = (),
    parent_hash: BlockHash = ROOT_HASH,
    start_block: int = 0,
) -> list[BlockHash]:
    """Hashes of the full blocks of `token_ids` from `start_block` on (parent = the one before).

    Same values as chaining `hash_block`, with the encoding done once for the whole prompt.
    """
    first = start_block * block_size
    num_full = (len(token_ids) - first) // block_size
    raw = _token_bytes(token_ids[first : first + num_full * block_size])
    extra = _extra_bytes(extra_keys)
    width = 4 * block_size
    hashes: list[BlockHash] = []
    for offset in range(0, len(raw), width):
        parent_hash = _hash(parent_hash, raw[offset : offset + width], extra)
        hashes.append(parent_hash)
    return hashes


def _hash(parent_hash: int, token_bytes: bytes, extra: bytes) -> BlockHash:
    """H(parent u64 LE, token count u32 LE, token ids u32 LE, extra keys)."""
    data = struct.pack("<QI", parent_hash, len(token_bytes) // 4) + token_bytes + extra
    return BlockHash(xxh3_64_intdigest(data, seed=HASH_SEED))


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    arr = array("I", token_ids)  # 4-byte unsigned on every platform CPython supports
    if sys.byteorder == "big":
        arr.byteswap()
    return arr.tobytes()


def _extra_bytes(extra_keys: ExtraKeys) -> bytes:
    parts = []
    for key in extra_keys:
        raw = key.encode()
        parts.append(struct.pack("<I", len(raw)) + raw)
    return b"".join(parts)


def request_extra_keys(model_identity: str, cache_salt: str | None) -> ExtraKeys:
    """The extra keys every block of a request is hashed with."""
    return (model_identity,) if cache_salt is None else (model_identity, "salt:" + cache_salt)
