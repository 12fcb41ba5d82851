"""`IncrementalDetokenizer` lives in `common.detokenizer` (the router detokenizes with it);
this path stays importable."""

from common.detokenizer import IncrementalDetokenizer

__all__ = ["IncrementalDetokenizer"]
