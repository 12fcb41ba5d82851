"""Benchmarks, and the load generator behind `baton bench` (run, sweep, compare).

    workload.py       BenchRequest and the Workload interface; workloads.py names them:
      synthetic.py      fixed lengths, ShareGPT-like lognormal lengths, long context
      shared_prefix.py  K system prompts with Zipf popularity
      multi_turn.py     chat sessions whose history grows
      trace.py          replay of a JSONL trace
    arrivals.py       Poisson (gamma burstiness), bursts, all at once, trace timestamps
    client.py         the client interface; http_client.py (OpenAI), grpc_client.py (Baton)
    runner.py         the load generator: schedule, concurrency limit, sessions, progress bar
    records.py        per-request measurements; metrics.py aggregates; slo.py goodput
    runs.py, sweep.py, session.py   one run, a rate sweep, one target end to end
    cluster_config.py, compare.py   `pd:1x1`-style configurations, started in turn
    report.py, plots.py, result.py  the terminal table, the PNGs, result.json
    cli.py, commands.py, command_line.py   `baton bench` (also `python -m bench`)

Single-purpose benchmarks, each against its baseline in the same run (`python -m bench.X`):
    engine_throughput.py   the offline engine against transformers `generate` (CPU)
    prefix_cache.py        TTFT warm against cold, throughput with prefix caching on and off
    prefix_routing.py      cluster prefix hit rate per routing policy; Redis routing latency
    gpu_engine.py          decode, 128 concurrent requests and prefill against transformers (GPU)
    gpu_kv_transfer.py     KV transfer against raw NCCL or a device copy; P/D TTFT (GPUs)
    kv_transfer_pair.py, graph_timing.py, local_redis.py, machine.py   what they share

One-off GPU probes live in the unshipped experiments/ folder; results the docs cite, in
bench/results/ (README.md there indexes them).
"""
