"""The cluster-wide prefix index: which workers hold which prompt prefixes.

Workers publish their engines' KV events (`publisher`); routers ask the index which workers
hold the longest cached prefix of a prompt (`base.PrefixIndex.match`). Two stores: in-process
(one router on one machine, fed over gRPC) and Redis (any number of routers and hosts). Both
sides import this package, so the Redis key schema and scripts live in exactly one place.
"""
