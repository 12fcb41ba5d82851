"""The decode worker (reserves blocks, receives KV, decodes in batches) and the colocated worker
(prefill and decode in one engine, the baseline)."""
