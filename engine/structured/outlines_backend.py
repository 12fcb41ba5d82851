"""The outlines backend (outlines-core): JSON schema, regex, choice and any JSON object, each
compiled to a regular expression and then to an index of the tokens allowed in each state of
its automaton. No context-free grammars (`grammar`) and no structural tags: refused.

JSON schemas go through `outlines_core.json_schema.build_regex_from_schema`, which reads some
keywords and passes over the rest; a schema using a keyword it would pass over is refused here
(`unenforced_keywords`) rather than compiled into a regex that lets through what the schema
forbids, and so is a string `pattern` that may match a quote, a backslash or a control
character (outlines-core puts the pattern into the JSON's regex as it stands). Integer ranges of
up to 1024 values become enums first (outlines-core ignores `minimum` and `maximum`). Objects
with `properties` take their properties in the schema's order and nothing else. `json_object`
is any JSON object nested one level (its values may be objects and arrays of values that are
neither): outlines-core's default of two levels takes about 50 times as long to index (17 s
against 0.3 s for a 512-token vocabulary; 2.6 s for one level over a 49k-token one).
"""

from __future__ import annotations

import json
import re
import re._parser as sre  # the standard library's regex parser (sre_parse before 3.11)
from typing import Any

import outlines_core as oc
import torch

from common.structured_outputs import StructuredOutputsParams
from engine.structured.backend import (
    CompiledGrammar,
    GrammarCompileError,
    GrammarMatcher,
    StructuredOutputBackend,
    TokenizerData,
)
from engine.structured.json_schema import (
    ANNOTATIONS,
    enforceable_schema,
    keywords_used,
    subschemas,
)
from engine.structured.vocabulary import token_bytes

# Rollbacks deeper than this rebuild the guide from the accepted tokens.
MAX_ROLLBACK = 64
# Keywords outlines-core 0.2 enforces (`minDigits` and the like are its own extensions).
ENFORCED_KEYWORDS = ANNOTATIONS | {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "$ref", "$defs", "definitions", "anyOf",
    "minLength", "maxLength", "pattern", "format", "minProperties", "maxProperties",
    "minDigits", "maxDigits", "minDigitsInteger", "maxDigitsInteger", "minDigitsFraction",
    "maxDigitsFraction", "minDigitsExponent", "maxDigitsExponent",
}  # fmt: skip
# outlines-core reads a schema node by the first of these it has and passes over the others'
# keywords but for the ones listed (annotations and `$defs` are always fine).
_READ_FIRST: dict[str, frozenset[str]] = {
    "properties": frozenset({"type", "required", "additionalProperties"}),
    "anyOf": frozenset(),
    "prefixItems": frozenset({"type", "items"}),  # exactly its items: fewer or more is stricter
    "enum": frozenset({"type"}),
    "const": frozenset({"type"}),
    "$ref": frozenset(),
}
_FREE_KEYWORDS = ANNOTATIONS | {"$defs", "definitions"}
_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~")
# Character classes with no `"`, `\\` or control character in them (\d, \w).
_SAFE_CATEGORIES = frozenset(
    {sre.CATEGORY_DIGIT, sre.CATEGORY_WORD, sre.CATEGORY_UNI_DIGIT, sre.CATEGORY_UNI_WORD}
)


class OutlinesMatcher(GrammarMatcher):
    """A `Guide` over the shared index, with the tokens it accepted (to rebuild it after a
    rollback deeper than the guide keeps, or after a reset)."""

    def __init__(self, index: oc.Index, eos_token_ids: tuple[int, ...]) -> None:
        self._index = index
        self._eos = eos_token_ids
        self._guide = oc.Guide(index, MAX_ROLLBACK)
        self._tokens: list[int] = []
        self._ended = False  # accepted an EOS where the pattern may end

    def accept_token(self, token_id: int) -> bool:
        if self._ended:
            return False
        if token_id in self._eos:
            self._ended = self._guide.is_finished()
            return self._ended
        try:
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:  # no transition: the token is not allowed here
            return False
        self._tokens.append(token_id)
        return True

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        words = bitmask[row]  # a contiguous row: the guide writes it whole
        self._guide.write_mask_into(words.data_ptr(), words.numel(), words.element_size())
        if self._guide.is_finished():  # the index allows its one EOS id; the model may have more
            for eos in self._eos:
                word, bit = divmod(eos, 32)
                words[word] |= -(1 << 31) if bit == 31 else 1 << bit

    def is_terminated(self) -> bool:
        return self._ended

    def rollback(self, num_tokens: int) -> bool:
        if self._ended and num_tokens:
            self._ended = False
            num_tokens -= 1
        if num_tokens > len(self._tokens):
            return False
        if num_tokens == 0:
            return True
        keep = len(self._tokens) - num_tokens
        if num_tokens <= self._guide.get_allowed_rollback():
            self._guide.rollback_state(num_tokens)
        else:
            self._guide = oc.Guide(self._index, MAX_ROLLBACK)
            for token in self._tokens[:keep]:
                self._guide.advance(token, return_tokens=False)
        del self._tokens[keep:]
        return True

    def reset(self) -> None:
        self._guide = oc.Guide(self._index, MAX_ROLLBACK)
        self._tokens.clear()
        self._ended = False


class OutlinesGrammar(CompiledGrammar):
    backend = "outlines"

    def __init__(self, index: oc.Index, eos_token_ids: tuple[int, ...]) -> None:
        self._index = index  # immutable, shared by every matcher
        self._eos = eos_token_ids

    def matcher(self) -> GrammarMatcher:
        return OutlinesMatcher(self._index, self._eos)


class OutlinesBackend(StructuredOutputBackend):
    """outlines-core over the model's tokenizer: its vocabulary (token bytes) is built once;
    each compile builds the regex's index over it (the costly part, on the compile threads)."""

    name = "outlines"

    def __init__(self, tokenizer: TokenizerData) -> None:
        super().__init__(tokenizer)
        by_text: dict[bytes, list[int]] = {}
        for token_id, text in token_bytes(tokenizer).items():
            by_text.setdefault(text, []).append(token_id)
        self._vocabulary = oc.Vocabulary(tokenizer.eos_token_ids[0], by_text)

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        regex = self.regex(params)
        try:
            index = oc.Index(regex, self._vocabulary)
        except Exception as e:  # outlines-core raises ValueError and others
            raise GrammarCompileError(params, self.name, _first_line(e)) from None
        return OutlinesGrammar(index, self.tokenizer.eos_token_ids)

    def regex(self, params: StructuredOutputsParams) -> str:
        """The regular expression `params` compiles to; GrammarCompileError when it has none."""
        kind = params.kind
        if kind == "regex":
            return without_outer_anchors(str(params.regex))
        if kind == "choice":
            return "|".join(escape(choice) for choice in params.choice or [])
        if kind in ("json", "json_object"):
            return self._json_regex(params)
        reason = {
            "grammar": "outlines-core compiles regular languages only, not grammars",
            "structural_tag": "structural tags are compiled by the xgrammar backend only",
        }[kind]
        raise GrammarCompileError(params, self.name, reason)

    def _json_regex(self, params: StructuredOutputsParams) -> str:
        any_object = {"type": "object", "depth": 1}  # json_object (depth 2 compiles 50x slower)
        schema = enforceable_schema(params, self.name, any_object, unenforced_keywords)
        whitespace = params.whitespace_pattern
        if whitespace is None and params.disable_any_whitespace:
            whitespace = ""
        try:
            return oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace)
        except Exception as e:
            raise GrammarCompileError(params, self.name, _first_line(e)) from None


def unenforced_keywords(schema: Any) -> list[str]:
    """Why outlines-core would not enforce all of `schema` (empty when it would): keywords it
    does not know, keywords beside one that it reads instead of them, and recursion (which it
    unrolls three levels deep, dropping even required properties below)."""
    problems = []
    unknown = sorted(keywords_used(schema) - ENFORCED_KEYWORDS)
    if unknown:
        problems.append(f"unsupported keywords {unknown}")
    for node in subschemas(schema):
        ignored = _ignored_beside(node)
        if ignored:
            problems.append(f"{ignored} would be ignored")
    if _recursive_ref(schema):
        problems.append("a recursive $ref")
    if any(node.get(k) == [] for node in subschemas(schema) for k in ("enum", "anyOf")):
        problems.append("an empty enum or anyOf (no value matches it)")
    patterns = [n["pattern"] for n in subschemas(schema) if isinstance(n.get("pattern"), str)]
    if any(may_leave_the_string(pattern) for pattern in patterns):
        problems.append('a pattern that may match ", \\ or a control character')
    return problems


def _ignored_beside(node: dict[str, Any]) -> list[str]:
    """The keywords of one schema node that outlines-core would pass over."""
    first = next((k for k in _READ_FIRST if k in node), None)
    if first is not None:
        ignored = sorted(node.keys() - _READ_FIRST[first] - _FREE_KEYWORDS - {first})
        if first == "properties" and node.get("type", "object") != "object":
            ignored.append("type")
        return [f"{k} beside {first}" for k in ignored]
    ignored = sorted({"required"} & node.keys())  # read only beside `properties`
    string_forms = [{"minLength", "maxLength"}, {"pattern"}, {"format"}]
    if sum(bool(form & node.keys()) for form in string_forms) > 1:  # it takes the first
        ignored.append("pattern or format beside minLength/maxLength, or format beside pattern")
    return ignored


def _recursive_ref(schema: Any) -> bool:
    """Whether a local `$ref` of `schema` leads back to itself."""

    def target(ref: str) -> Any:
        node = schema
        for part in ref.lstrip("#").split("/"):
            node = node.get(part, {}) if part and isinstance(node, dict) else node
        return node

    def refs_in(node: Any) -> set[str]:
        return {n["$ref"] for n in subschemas(node) if isinstance(n.get("$ref"), str)}

    def leads_back(ref: str, path: tuple[str, ...]) -> bool:
        return ref in path or any(leads_back(r, (*path, ref)) for r in refs_in(target(ref)))

    return any(leads_back(ref, ()) for ref in refs_in(schema))


def may_leave_the_string(pattern: str) -> bool:
    """Whether a string's `pattern` may match `"`, `\\` or a control character: outlines-core
    puts the pattern into the JSON's regex as it stands, so such a character would end the
    string or make it invalid. True also where Python's `re` cannot read the pattern to tell
    (JSON-schema patterns are ECMA-262: Python reads the common part)."""
    try:
        tree = sre.parse(pattern)
    except re.error:
        return True
    return _may_match_breaking(tree)


def _may_match_breaking(items: Any) -> bool:
    for op, arg in items:
        if op is sre.IN:
            found = any(_class_item_breaks(item_op, item) for item_op, item in arg)
        elif op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.CATEGORY):
            found = _class_item_breaks(op, arg)
        else:  # groups, repeats, branches: look inside
            found = any(_may_match_breaking(sub) for sub in _subpatterns(arg))
        if found:
            return True
    return False


def _class_item_breaks(op: Any, arg: Any) -> bool:
    if op is sre.LITERAL:
        return arg < 0x20 or chr(arg) in '"\\'
    if op is sre.RANGE:
        low, high = arg
        return low < 0x20 or any(low <= ord(c) <= high for c in '"\\')
    if op is sre.CATEGORY:
        return arg not in _SAFE_CATEGORIES
    return True  # ANY, NOT_LITERAL, NEGATE: all but a few characters


def _subpatterns(arg: Any) -> list[Any]:
    if isinstance(arg, sre.SubPattern):
        return [arg]
    if isinstance(arg, list | tuple):
        return [sub for item in arg for sub in _subpatterns(item)]
    return []


def without_outer_anchors(regex: str) -> str:
    """`regex` without a leading `^` and a trailing (unescaped) `$`: the match is of the whole
    output anyway, and outlines-core's automaton takes no anchors."""
    if regex.startswith("^"):
        regex = regex[1:]
    escapes = len(regex[:-1]) - len(regex[:-1].rstrip("\\"))
    if regex.endswith("$") and escapes % 2 == 0:
        regex = regex[:-1]
    return regex


def escape(text: str) -> str:
    """`text` as a regex that matches it literally (in outlines-core's regex syntax)."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
