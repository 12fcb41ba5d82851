"""The guidance backend (llguidance): JSON schema, regex, choice, Lark or GBNF grammar."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from common.structured_outputs import StructuredOutputsParams
from engine.structured.backend import (
    CompiledGrammar,
    GrammarCompileError,
    GrammarMatcher,
    StructuredOutputBackend,
    TokenizerData,
)
from engine.structured.json_schema import without_additional_properties


class GuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: tuple[int, ...]) -> None:
        self._matcher = matcher
        self._eos = eos_token_ids
        self._ended = False  # accepted an EOS where the grammar may end

    def accept_token(self, token_id: int) -> bool:
        if self._matcher.is_error():
            return False
        if token_id in self._eos and self._matcher.is_accepting():
            self._ended = True  # llguidance's EOS is one id: any of the model's counts
            return True
        # A refused token leaves llguidance's matcher in its error state for good.
        return bool(self._matcher.consume_token(token_id))

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, row)
        if self._matcher.is_accepting():
            for eos in self._eos:
                bitmask[row, eos // 32] |= _bit(eos % 32)

    def is_terminated(self) -> bool:
        return self._ended

    def rollback(self, num_tokens: int) -> bool:
        if self._ended and num_tokens:
            self._ended = False
            num_tokens -= 1
        return bool(self._matcher.rollback(num_tokens)) if num_tokens else True

    def reset(self) -> None:
        self._ended = False
        self._matcher.reset()


def _bit(i: int) -> int:
    """Bit `i` of an int32 word as a Python int the tensor accepts (bit 31 is negative)."""
    return -(1 << 31) if i == 31 else 1 << i


class GuidanceGrammar(CompiledGrammar):
    backend = "guidance"

    def __init__(self, grammar: str, tokenizer: llguidance.LLTokenizer, eos: tuple[int, ...]):
        self._grammar = grammar
        self._tokenizer = tokenizer
        self._eos = eos

    def matcher(self) -> GrammarMatcher:
        return GuidanceMatcher(llguidance.LLMatcher(self._tokenizer, self._grammar), self._eos)


class GuidanceBackend(StructuredOutputBackend):
    """llguidance over the model's tokenizer; a grammar is checked against the tokenizer when
    compiled (so a bad one fails its request at once, not at its first token)."""

    name = "guidance"

    def __init__(self, tokenizer: TokenizerData) -> None:
        super().__init__(tokenizer)
        self._tokenizer = llguidance.hf.from_tokenizer(
            tokenizer.tokenizer,
            n_vocab=tokenizer.vocab_size,
            eos_token=list(tokenizer.eos_token_ids)[0],
        )

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        try:
            grammar = self._grammar(params)
        except ValueError as e:
            raise GrammarCompileError(params, self.name, str(e).splitlines()[0]) from None
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._tokenizer
        )
        if is_error:
            raise GrammarCompileError(params, self.name, messages[0].splitlines()[0][:300])
        return GuidanceGrammar(grammar, self._tokenizer, self.tokenizer.eos_token_ids)

    def _grammar(self, params: StructuredOutputsParams) -> str:
        kind = params.kind
        if kind in ("json", "json_object"):
            schema = _schema(params)
            options: dict[str, Any] = {"whitespace_flexible": not params.disable_any_whitespace}
            if params.whitespace_pattern is not None:
                options["whitespace_pattern"] = params.whitespace_pattern
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)  # type: ignore[arg-type]
        if kind == "regex":
            return llguidance.grammar_from("regex", str(params.regex))
        if kind == "choice":
            return llguidance.grammar_from("choice", json.dumps(params.choice))
        if kind == "grammar":
            return llguidance.grammar_from("grammar", str(params.grammar))
        raise ValueError("structural tags are compiled by the xgrammar backend only")


def _schema(params: StructuredOutputsParams) -> dict[str, Any]:
    if params.kind == "json_object":
        return {"type": "object"}
    raw = params.json
    schema = raw if isinstance(raw, dict) else json.loads(str(raw))
    if params.disable_additional_properties:
        schema = without_additional_properties(schema)
    return schema
