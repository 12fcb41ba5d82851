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

Older single-purpose benchmarks: engine_throughput.py, prefix_cache.py, cluster_compare.py (now
a wrapper of `baton bench compare`).
"""
