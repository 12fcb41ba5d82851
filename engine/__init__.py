"""Baton's model-execution engine, used by both worker roles and in-process by `LLM`.

The public names load lazily so that `import engine.kv_cache...` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.sampling_params import SamplingParams
    from common.structured_outputs import StructuredOutputsParams
    from engine.llm import LLM
    from engine.outputs import CompletionOutput, RequestOutput

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]

_LAZY = {
    "LLM": "engine.llm",
    "SamplingParams": "common.sampling_params",
    "StructuredOutputsParams": "common.structured_outputs",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
