"""Baton's router: the OpenAI-compatible HTTP and `baton.v1.Router` gRPC front of the cluster.

It tokenizes (chat templates included), picks workers, drives one request through a
prefill/decode pair (or a colocated worker), detokenizes and applies stop strings exactly as the
offline `engine.llm.LLM` does (with the same code: `common`), and exports Prometheus metrics.
It imports no torch and nothing of `engine` (tests/test_layering.py checks both).

Module map::

    config.py        RouterConfig: addresses, ports, deadlines, policy (the CLI's options)
    errors.py        RouterError and its kinds, with their HTTP status and gRPC code
    workers.py       WorkerInfo: one worker's address, role, health and last load
    registry.py      WorkerRegistry: channels, stubs, the GetLoad / health poll loop
    policies.py      RoutingPolicy: round_robin, least_loaded (RequestContext: block hashes)
    aborts.py        AbortSender: best-effort Abort RPCs that survive cancellation
    backend.py       Backend interface: one worker request -> a stream of TokenChunks
    disaggregated.py Reserve on D, Prefill on P (retried once), Decode on D
    colocated.py     Generate on a colocated worker
    preprocess.py    Preprocessor: prompt -> token ids, validation, resolved max_tokens
    completion.py    apply_chunk: a worker's TokenChunk through common's CompletionTracker
    generation.py    Generator: fans a request out into n completions (common.fan_out), merges
                     their deltas
    streams.py       merge_streams: several async streams as one, cancelled together
    metrics.py       Prometheus metrics (baton:*)
    services.py      RouterServices: the parts above wired together once
    openai/          the HTTP API (FastAPI): protocol.py (request models), completions.py,
                     chat.py, responses.py (response shapes), errors.py, serving.py,
                     tokenization.py (/tokenize, /detokenize), app.py
    auth.py          --api-key: Bearer check on /v1/* and the gRPC Router service
    grpc_service.py  baton.v1.Router/Generate, health, reflection
    server.py        HTTP and gRPC in one asyncio process, graceful drain on SIGTERM
    testing.py       RouterThread: a router on free ports in a background thread (tests)
"""
