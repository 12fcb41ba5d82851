"""Baton's launcher: the `baton` command line (generate, make-tiny-model, demo-model, ...).

Nothing else in Baton imports this package; it imports everything else.
"""
