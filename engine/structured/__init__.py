"""Structured outputs: constrain a request's tokens to a grammar (JSON schema, regex, ...).

    backend.py          the interface: StructuredOutputBackend -> CompiledGrammar -> GrammarMatcher
    registry.py         backends by name, and `auto` (xgrammar, then guidance, then outlines)
    backend_choice.py   vLLM's `--structured-outputs-config` JSON (backend, disable_fallback)
    xgrammar_backend.py, guidance_backend.py, outlines_backend.py, lmfe_backend.py
                        the backends over their libraries (xgrammar, llguidance, outlines-core,
                        lm-format-enforcer)
    lmfe_json.py        what lm-format-enforcer's JSON parser enforces, and fixes to it
    json_schema.py      JSON-schema walks and rewrites the backends share
    vocabulary.py       the tokens' bytes, for the backends that match text (outlines, lmfe)
    compiler.py         GrammarCompiler: compiles on a thread pool, LRU cache by backend and spec
    matcher_state.py    RequestGrammar: one request's compile future and matcher (replay on sync)
    bitmask.py          the batch's allowed-token bitmask and its application to the logits
    manager.py          StructuredOutputManager: the engine's one entry point (tokenizer, compiles)

The libraries load only when a backend is first used.
"""
