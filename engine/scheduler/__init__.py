"""Continuous batching: which requests run each step, and how many tokens each computes."""
