"""The lm-format-enforcer backend: JSON schema, regex, choice and any JSON object, matched
character by character by its parsers over a prefix tree of the tokens' text. No grammars and
no structural tags: refused.

lm-format-enforcer's `TokenEnforcer` keys its states by the whole output so far (a tuple per
step: time and memory quadratic in the output's length). The matcher here keeps its own stack of
the enforcer's states instead, through two of the enforcer's methods (`_apply_new_characters`,
`_compute_allowed_tokens`; lm-format-enforcer 0.11, pinned), and turns each state's allowed
token list into the bitmask with numpy (cached per list: the enforcer reuses a state's list
wherever its parser says the state repeats).

Schemas its JSON parser would not enforce are refused, and two of its slips are closed
(engine.structured.lmfe_json). Its tokenizer data is built here from the tokens' bytes: a token
that is part of a character is left out (its parsers match characters and would count the part
as one), and JSON strings never hold raw control characters (its free-text token lists would
let them in). `json_object` is any JSON object whose values hold no numbers.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import lmformatenforcer as lmfe
import numpy as np
import torch
from lmformatenforcer.tokenizerprefixtree import JsonFreetextTokenCache

from common.structured_outputs import StructuredOutputsParams
from engine.structured.backend import (
    CompiledGrammar,
    GrammarCompileError,
    GrammarMatcher,
    StructuredOutputBackend,
    TokenizerData,
)
from engine.structured.json_schema import enforceable_schema
from engine.structured.lmfe_json import ANY_OBJECT_SCHEMA, JsonFixes, unenforced
from engine.structured.vocabulary import token_bytes

MASK_CACHE_SIZE = 256  # allowed-token lists whose bitmask row is kept, per grammar
_State = lmfe.TokenEnforcer.OutputTensorState


class LmfeMatcher(GrammarMatcher):
    """A stack of the enforcer's states, one per accepted token (the root at the bottom)."""

    def __init__(self, grammar: LmfeGrammar) -> None:
        self._grammar = grammar
        self._stack = [grammar.root_state()]
        self._ended = False  # accepted an EOS where the parser may end

    def accept_token(self, token_id: int) -> bool:
        if self._ended or not self._grammar.allows(self._stack[-1], token_id):
            return False
        if token_id in self._grammar.eos_token_ids:
            self._ended = True
        else:
            self._stack.append(self._grammar.advance(self._stack[-1], token_id))
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = self._grammar.mask(self._stack[-1])

    def is_terminated(self) -> bool:
        return self._ended

    def rollback(self, num_tokens: int) -> bool:
        if self._ended and num_tokens:
            self._ended = False
            num_tokens -= 1
        if num_tokens >= len(self._stack):
            return False
        del self._stack[len(self._stack) - num_tokens :]
        return True

    def reset(self) -> None:
        del self._stack[1:]
        self._ended = False


class LmfeGrammar(CompiledGrammar):
    """One parser and its enforcer, shared by the spec's matchers (all on the engine's thread:
    the parsers share a context they set on each call)."""

    backend = "lm-format-enforcer"

    def __init__(self, enforcer: lmfe.TokenEnforcer, data: LmfeTokenizerData) -> None:
        self.enforcer = enforcer
        self.eos_token_ids = data.eos_token_ids
        self._vocab_size = data.vocab_size
        self._masks: OrderedDict[int, tuple[Any, torch.Tensor]] = OrderedDict()

    def matcher(self) -> GrammarMatcher:
        return LmfeMatcher(self)

    def root_state(self) -> Any:
        return _State(parser=self.enforcer.root_parser)

    def advance(self, state: Any, token_id: int) -> Any:
        """The state after `token_id` (only the sequence's last token is read)."""
        return self.enforcer._apply_new_characters(state, [token_id])

    def allows(self, state: Any, token_id: int) -> bool:
        if not 0 <= token_id < self._vocab_size:
            return False
        word, bit = divmod(token_id, 32)
        return bool((int(self.mask(state)[word]) >> bit) & 1)

    def mask(self, state: Any) -> torch.Tensor:
        """The bitmask row (cdiv(V, 32),) int32 of the tokens `state` allows next."""
        if state.allowed_tokens is None:
            self.enforcer._compute_allowed_tokens((), state)
        allowed = state.allowed_tokens
        cached = self._masks.get(id(allowed))
        if cached is not None and cached[0] is allowed:
            self._masks.move_to_end(id(allowed))
            return cached[1]
        mask = allowed_bitmask(allowed.allowed_tokens, self._vocab_size)
        self._masks[id(allowed)] = (allowed, mask)  # the list kept alive: its id stays its own
        if len(self._masks) > MASK_CACHE_SIZE:
            self._masks.popitem(last=False)
        return mask


def allowed_bitmask(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    """(cdiv(vocab_size, 32),) int32: bit t set for each t of `token_ids` below `vocab_size`."""
    width = -(-vocab_size // 32)
    bits = np.zeros(width * 32, dtype=np.bool_)
    ids = np.asarray(token_ids, dtype=np.int64)
    bits[ids[(ids >= 0) & (ids < vocab_size)]] = True
    return torch.from_numpy(np.packbits(bits, bitorder="little").view("<i4").copy())


class LmfeTokenizerData:
    """lm-format-enforcer's per-tokenizer data: the text of each regular token that is whole
    characters (a part of a character is left out: the parsers match characters, and would
    count a part as a character of its own), the EOS ids."""

    def __init__(self, tokenizer: TokenizerData) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eos_token_ids = tokenizer.eos_token_ids
        texts = {i: text for i, b in token_bytes(tokenizer).items() if (text := _utf8(b))}
        self._texts = texts
        regular = [(i, text, True) for i, text in texts.items()]  # True: no context needed
        self.data = lmfe.TokenEnforcerTokenizerData(
            regular, self.decode, list(tokenizer.eos_token_ids), False, tokenizer.vocab_size
        )
        # JSON strings may not hold raw control characters: neither as "any character" nor
        # in the free-text token lists (lm-format-enforcer checks only \n and \r there).
        self.data.tokenizer_alphabet = _printable(self.data.tokenizer_alphabet)
        freetext = JsonFreetextTokenCache(False, tokenizer.vocab_size)
        for i, text in texts.items():
            if text and text == _printable(text):
                freetext.add_token(text, i)
        freetext.freeze()
        self.data.tokenizer_tree.json_freetext_tokens = freetext

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`."""
        return "".join(self._texts.get(t, "") for t in token_ids)

    def config(self, params: StructuredOutputsParams) -> Any:
        """The parsers' settings for `params`: all set here (not from LMFE_* variables)."""
        return lmfe.CharacterLevelParserConfig(
            alphabet=self.data.tokenizer_alphabet,
            max_consecutive_whitespaces=0 if params.disable_any_whitespace else 12,
            force_json_field_order=False,
            max_json_array_length=20,  # its default: arrays without maxItems end by then
        )


def _printable(text: str) -> str:
    return "".join(c for c in text if c >= " ")


def _utf8(text: bytes) -> str | None:
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        return None


class LmfeBackend(StructuredOutputBackend):
    """lm-format-enforcer over the model's tokenizer (its prefix tree built once)."""

    name = "lm-format-enforcer"

    def __init__(self, tokenizer: TokenizerData) -> None:
        super().__init__(tokenizer)
        self._data = LmfeTokenizerData(tokenizer)

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        config = self._data.config(params)
        try:
            parser = self._parser(params, config)
        except GrammarCompileError:
            raise
        except Exception as e:  # interegular's and pydantic's errors, among others
            raise GrammarCompileError(params, self.name, _first_line(e)) from None
        enforcer = lmfe.TokenEnforcer(self._data.data, parser)
        parser.config = config  # the enforcer set its own (whitespace and all from LMFE_*)
        return LmfeGrammar(enforcer, self._data)

    def _parser(self, params: StructuredOutputsParams, config: Any) -> Any:
        kind = params.kind
        if kind == "regex":
            return lmfe.RegexParser(str(params.regex), config)
        if kind == "choice":
            choices = [lmfe.StringParser(c) for c in params.choice or []]
            return lmfe.UnionParser(choices)
        if kind in ("json", "json_object"):
            return JsonFixes(lmfe.JsonSchemaParser(self._schema(params), config))
        reason = {
            "grammar": "lm-format-enforcer takes JSON schemas and regular expressions only",
            "structural_tag": "structural tags are compiled by the xgrammar backend only",
        }[kind]
        raise GrammarCompileError(params, self.name, reason)

    def _schema(self, params: StructuredOutputsParams) -> dict[str, Any]:
        if params.whitespace_pattern is not None:
            reason = "whitespace_pattern is not supported (disable_any_whitespace is)"
            raise GrammarCompileError(params, self.name, reason)
        return enforceable_schema(params, self.name, ANY_OBJECT_SCHEMA, unenforced)


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
