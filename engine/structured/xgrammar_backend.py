"""The xgrammar backend (the default): JSON schema, regex, choice, EBNF grammar, structural tag.

JSON-schema keywords xgrammar's documentation does not list as supported are refused here
rather than compiled and silently not enforced, so `auto` sends such schemas to guidance.

xgrammar 0.2.9 compiles a string with minLength/maxLength to `[^"\\\r\n]{m,n}`, which lets raw
control characters through (invalid JSON, found by the temperature-1 tests): such strings
(without a pattern or format of their own) are written as a chain of rules of JSON string
characters instead, or as a pattern of them past `MAX_CHAIN_LENGTH` (engine.structured.
xgrammar_strings says why a chain: a pattern near its bound made the mask fill ~1,000x slower).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
import xgrammar as xgr

from common.structured_outputs import StructuredOutputsParams
from engine.structured.backend import (
    CompiledGrammar,
    GrammarCompileError,
    GrammarMatcher,
    StructuredOutputBackend,
    TokenizerData,
    choice_as_ebnf,
)
from engine.structured.json_schema import keywords_used
from engine.structured.xgrammar_strings import (
    JSON_STRING_CHAR,
    MAX_CHAIN_LENGTH,
    bounded_strings_as_patterns,
    json_schema_as_ebnf,
)

__all__ = [
    "JSON_STRING_CHAR",
    "MAX_CHAIN_LENGTH",
    "XgrammarBackend",
    "bounded_strings_as_patterns",
]

# Keywords that constrain values but that xgrammar would not enforce.
UNSUPPORTED_JSON_KEYWORDS = frozenset(
    {
        "multipleOf",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "propertyNames",
        "not",
        "if",
        "then",
        "else",
        "dependentRequired",
        "dependentSchemas",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
# xgrammar's compiler reuses the token masks of rules it compiled before in any later grammar
# over the same tokenizer, so a new schema pays only for its new rules: a schema of two
# maxLength-16 strings took ~90 ms on the demo vocabulary (49k tokens, one core), ~85 of them
# for the 17 rules of their chain; a new schema with the same strings ~2 ms. The bound (bytes)
# holds its whole grammars too, which the engine's cache already keeps.
COMPILER_CACHE_BYTES = 64 << 20


class XgrammarMatcher(GrammarMatcher):
    def __init__(self, matcher: xgr.GrammarMatcher) -> None:
        self._matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def rollback(self, num_tokens: int) -> bool:
        self._matcher.rollback(num_tokens)
        return True

    def reset(self) -> None:
        self._matcher.reset()


class XgrammarGrammar(CompiledGrammar):
    backend = "xgrammar"

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self._compiled = compiled

    def matcher(self) -> GrammarMatcher:
        return XgrammarMatcher(xgr.GrammarMatcher(self._compiled))


class XgrammarBackend(StructuredOutputBackend):
    """xgrammar's GrammarCompiler over the model's tokenizer, with its cache on and bounded
    (`COMPILER_CACHE_BYTES`) for the token masks of rules it has compiled: the engine's cache
    (keyed by backend and spec) keeps whole grammars."""

    name = "xgrammar"

    def __init__(self, tokenizer: TokenizerData) -> None:
        super().__init__(tokenizer)
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer.tokenizer,
            vocab_size=tokenizer.vocab_size,
            stop_token_ids=list(tokenizer.eos_token_ids),
        )
        self._compiler = xgr.GrammarCompiler(
            info, max_threads=1, cache_enabled=True, cache_limit_bytes=COMPILER_CACHE_BYTES
        )

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        try:
            return XgrammarGrammar(self._compile(params))
        except GrammarCompileError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError and its own error types
            raise GrammarCompileError(params, self.name, _first_line(e)) from None

    def _compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        kind, compiler = params.kind, self._compiler
        whitespace = not params.disable_any_whitespace
        if kind == "json":
            schema = params.json if isinstance(params.json, dict) else json.loads(str(params.json))
            bad = sorted(unsupported_keywords(schema))
            if bad:
                raise GrammarCompileError(params, self.name, f"unsupported keywords {bad}")
            return self._compile_json_schema(schema, whitespace)
        if kind == "json_object":
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=whitespace)
        if kind == "regex":
            return compiler.compile_regex(str(params.regex))
        if kind == "choice":
            return compiler.compile_grammar(choice_as_ebnf(params.choice or []))
        if kind == "grammar":
            return compiler.compile_grammar(str(params.grammar))
        assert kind == "structural_tag"
        tag = params.structural_tag
        return compiler.compile_structural_tag(tag if isinstance(tag, str) else json.dumps(tag))

    def _compile_json_schema(self, schema: Any, whitespace: bool) -> xgr.CompiledGrammar:
        """Bounded strings as chains of rules where xgrammar's grammar lets us swap them in,
        else (or should xgrammar not read back its own grammar's text) as patterns."""
        ebnf = json_schema_as_ebnf(schema, whitespace)
        if ebnf is not None:
            try:
                return self._compiler.compile_grammar(ebnf)
            except RuntimeError:
                pass
        patterned = json.dumps(bounded_strings_as_patterns(schema))
        return self._compiler.compile_json_schema(patterned, any_whitespace=whitespace)


def unsupported_keywords(schema: Any) -> set[str]:
    """The keywords of `UNSUPPORTED_JSON_KEYWORDS` used anywhere in `schema` (as keywords, not
    as property names)."""
    return keywords_used(schema) & UNSUPPORTED_JSON_KEYWORDS


def _first_line(e: Exception) -> str:
    """The error's first line without xgrammar's "[time] file.cc:line: " prefix."""
    text = str(e).strip() or type(e).__name__
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", text.splitlines()[0])[:300]
