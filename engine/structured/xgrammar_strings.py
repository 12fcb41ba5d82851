"""Length-bounded JSON strings for xgrammar: exact, and cheap to mask.

xgrammar 0.2.9 compiles a string with minLength/maxLength to `[^"\\\r\n]{m,n}`, which lets raw
control characters through (invalid JSON, found by the temperature-1 tests); its negated classes
also read UTF-8 laxly, so overlong encodings (`E0 80 81`, a control character in disguise) pass.
A positive class of the characters a JSON string may hold unescaped (`JSON_STRING_CHAR`) is
exact: overlong encodings, surrogates, lone continuation bytes are refused.

Written as a pattern `^C{m,n}$`, though, a 128k byte-level vocabulary made the mask fill inside
such a string take up to ~50 ms a row (mean 4 ms along a document of short strings; 0.003 ms
unbounded). xgrammar's token-mask cache is computed per grammar position, rule by rule, and the
repetition is a rule of its own that ends before the closing quote: with r characters left, a
token of more than r characters is allowed or not by what follows the rule, so the cache marks
it "uncertain" and every fill runs the parser over it. Near the bound that is most of a
vocabulary of words.

So a bounded string (maxLength at most `MAX_CHAIN_LENGTH`) becomes a chain of rules, each of
which holds the closing quote:

    string_{need,left} ::= "\"" (need == 0) | C string_{need-1,left-1} (left > 0)

need = characters still required, left = characters still allowed. The cache, seeing the quote
inside each rule, decides every token at compile time (a token longer than `left` is refused
there), and the fill costs what an unbounded string's does. Rules are shared by every string
with the same (need, left). Compiling costs one cache entry per rule, as the pattern's
repetition did: longer bounds keep the pattern. xgrammar's compiler keeps those entries for
later grammars (engine.structured.xgrammar_backend.COMPILER_CACHE_BYTES), so a chain's rules are
computed once per tokenizer, not once per schema.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import xgrammar as xgr

from engine.structured.json_schema import ANNOTATIONS, map_subschemas

# A character a JSON string may hold unescaped: not a control character, '"' or '\\', nor a
# surrogate (not a character; its UTF-8 bytes are invalid). The range ends at the character
# U+10FFFF itself: xgrammar reads no \U escape (written so, every mask fill inside such a
# string took its slow path), and a negated class there reads UTF-8 laxly (see above).
JSON_STRING_CHAR = "[ !#-\\[\\]-\\ud7ff\\ue000-" + chr(0x10FFFF) + "]"
# The longest maxLength written as a chain of rules; longer bounds keep the pattern (each rule
# costs a pass over the vocabulary when compiling: about 70 ms for 128k tokens on one core).
MAX_CHAIN_LENGTH = 128
_CHAIN_KEYS = frozenset({"type", "minLength", "maxLength"}) | ANNOTATIONS


def bounded_strings_as_patterns(schema: Any) -> Any:
    """A copy of `schema` whose strings with minLength/maxLength (and no pattern or format)
    have the pattern of as many `JSON_STRING_CHAR`s instead."""
    return map_subschemas(schema, _bounded_string_as_pattern)


def _bounded_string_as_pattern(node: dict[str, Any]) -> dict[str, Any]:
    bounded = "minLength" in node or "maxLength" in node
    if node.get("type") != "string" or not bounded or {"pattern", "format"} & node.keys():
        return node
    out = dict(node)
    low = int(out.pop("minLength", 0))
    high = out.pop("maxLength", None)
    out["pattern"] = f"^{JSON_STRING_CHAR}{{{low},{'' if high is None else int(high)}}}$"
    return out


def json_schema_as_ebnf(schema: Any, any_whitespace: bool) -> str | None:
    """xgrammar's EBNF grammar for `schema`, its bounded strings as chains of rules (others
    as `bounded_strings_as_patterns` has them); None when it has no string to chain, or when
    xgrammar's grammar holds one where it can't be swapped (then the patterns serve)."""
    marker = f"baton-bounded-string-{uuid.uuid4().hex}"
    bounds: dict[str, tuple[int, int]] = {}

    def mark(node: dict[str, Any]) -> Any:
        chain = _chain_bounds(node)
        if chain is None:
            return _bounded_string_as_pattern(node)
        const = f"{marker}-{len(bounds)}"
        bounds[const] = chain
        return {"const": const}

    marked = map_subschemas(schema, mark)
    if not bounds:
        return None
    grammar = xgr.Grammar.from_json_schema(json.dumps(marked), any_whitespace=any_whitespace)
    text, rules = str(grammar), {}
    for const, (low, high) in bounds.items():
        # xgrammar writes a const string as one literal, its quotes escaped
        text = text.replace(f'"\\"{const}\\""', f'"\\"" {_chain(low, high, rules)}')
    if marker in text:  # a const merged into a longer literal: leave it to the patterns
        return None
    return text + "\n".join(rules.values()) + "\n"


def _chain_bounds(node: dict[str, Any]) -> tuple[int, int] | None:
    """(minLength, maxLength) of a plain bounded string whose chain is short enough."""
    if node.get("type") != "string" or "maxLength" not in node or node.keys() - _CHAIN_KEYS:
        return None
    low, high = node.get("minLength", 0), node["maxLength"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
        return None
    return (low, high) if 0 <= low <= high <= MAX_CHAIN_LENGTH else None


def _chain(low: int, high: int, rules: dict[str, str]) -> str:
    """The first rule of the chain for a string of `low` to `high` characters and its closing
    quote; adds the chain's rules to `rules` (name -> definition)."""
    for i in range(high + 1):
        need, left = max(low - i, 0), high - i
        name = _rule_name(need, left)
        if name in rules:  # so is the rest of the chain
            break
        options = ['"\\""'] if need == 0 else []
        if left:
            options.append(f"{JSON_STRING_CHAR} {_rule_name(max(need - 1, 0), left - 1)}")
        rules[name] = f"{name} ::= {' | '.join(options)}"
    return _rule_name(low, high)


def _rule_name(need: int, left: int) -> str:
    return f"baton_string_{need}_{left}"
