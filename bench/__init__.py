"""Benchmarks and (later) the load generator behind `baton bench`."""
