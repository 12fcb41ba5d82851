"""Grammar backends by name, and `auto`: vLLM's rule of trying them in turn.

    auto:  xgrammar --cannot compile--> guidance --cannot compile--> outlines (if registered)

A backend named explicitly never falls back: its error is the request's; nor does `auto` with
fallback disabled (`StructuredOutputsConfig.disable_fallback`: xgrammar alone). Users may register
their own backend class under a new name (`register_backend`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from common.structured_outputs import StructuredOutputsParams
from engine.structured.backend import (
    CompiledGrammar,
    GrammarCompileError,
    StructuredOutputBackend,
    TokenizerData,
)

BackendFactory = Callable[[TokenizerData], StructuredOutputBackend]

AUTO = "auto"
AUTO_ORDER = ("xgrammar", "guidance", "outlines")

_BACKENDS: dict[str, str | BackendFactory] = {
    "xgrammar": "engine.structured.xgrammar_backend:XgrammarBackend",
    "guidance": "engine.structured.guidance_backend:GuidanceBackend",
    "outlines": "engine.structured.outlines_backend:OutlinesBackend",
    "lm-format-enforcer": "engine.structured.lmfe_backend:LmfeBackend",
}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make `factory(tokenizer)` the backend called `name` (replacing one of that name)."""
    if name == AUTO:
        raise ValueError("'auto' is the fallback rule, not a backend name")
    _BACKENDS[name] = factory


def backend_names() -> list[str]:
    """The registered backends, then `auto`."""
    return [*_BACKENDS, AUTO]


def backend_factory(name: str) -> BackendFactory:
    """The factory registered as `name`; ValueError naming the known ones otherwise."""
    entry = _BACKENDS.get(name)
    if entry is None:
        raise ValueError(
            f"structured outputs backend {name!r} is unknown; known: {', '.join(backend_names())}"
        )
    if isinstance(entry, str):  # imported on first use: the libraries load only when needed
        module, attr = entry.split(":")
        entry = _BACKENDS[name] = getattr(importlib.import_module(module), attr)
    return entry


class Backends:
    """The backends of one engine, each built on first use over the engine's tokenizer."""

    def __init__(self, tokenizer: TokenizerData) -> None:
        self.tokenizer = tokenizer
        self._built: dict[str, StructuredOutputBackend] = {}

    def get(self, name: str) -> StructuredOutputBackend:
        backend = self._built.get(name)
        if backend is None:
            backend = self._built[name] = backend_factory(name)(self.tokenizer)
        return backend

    def compile(
        self, name: str, params: StructuredOutputsParams, fallback: bool = True
    ) -> CompiledGrammar:
        """Compile with backend `name`, or under `auto` with the first of `AUTO_ORDER` (among
        those registered) that takes it; GrammarCompileError with each backend's complaint.
        Without `fallback`, `auto` is the first of `AUTO_ORDER` alone and its error is the
        request's (vLLM's `disable_fallback`)."""
        candidates = [n for n in AUTO_ORDER if n in _BACKENDS]
        if name != AUTO or not fallback:
            return self.get(name if name != AUTO else candidates[0]).compile(params)
        errors: list[GrammarCompileError] = []
        for candidate in candidates:
            try:
                return self.get(candidate).compile(params)
            except GrammarCompileError as e:
                errors.append(e)
        reasons = "; ".join(f"{e.backend}: {e.reason}" for e in errors)
        raise GrammarCompileError(params, AUTO, f"no backend takes it ({reasons})")
