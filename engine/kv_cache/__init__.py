"""The paged KV cache's bookkeeping: blocks, the pool, and per-request block tables."""
