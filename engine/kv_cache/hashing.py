"""The block hash lives in `common.block_hash` (the router hashes prompts with it); this path
stays importable for the KV cache's modules."""

from common.block_hash import (
    HASH_SEED,
    ROOT_HASH,
    BlockHash,
    ExtraKeys,
    hash_block,
    hash_prompt_blocks,
    request_extra_keys,
)

__all__ = [
    "HASH_SEED",
    "ROOT_HASH",
    "BlockHash",
    "ExtraKeys",
    "hash_block",
    "hash_prompt_blocks",
    "request_extra_keys",
]
