"""Structured outputs: constrain a request's tokens to a grammar (JSON schema, regex, ...).

    backend.py          the interface: StructuredOutputBackend -> CompiledGrammar -> GrammarMatcher
    registry.py         backends by name, and `auto` (xgrammar, then guidance)
    backend_choice.py   vLLM's `--structured-outputs-config` JSON (backend, disable_fallback)
    xgrammar_backend.py, guidance_backend.py   the backends over their libraries
    compiler.py         GrammarCompiler: compiles on a thread pool, LRU cache by backend and spec
    matcher_state.py    RequestGrammar: one request's compile future and matcher (replay on sync)
    bitmask.py          the batch's allowed-token bitmask and its application to the logits
    manager.py          StructuredOutputManager: the engine's one entry point (tokenizer, compiles)

The libraries load only when a backend is first used.
"""
