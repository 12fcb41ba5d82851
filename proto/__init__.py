"""Baton's service contracts: `baton/v1/*.proto` and the Python stubs generated from them.

Regenerate the stubs with `python -m proto.generate` (tests check they are current).
"""
