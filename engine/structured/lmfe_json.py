"""lm-format-enforcer's JSON parser: which schemas it enforces, and two of its slips closed.

    unenforced(schema)   why its parser would not enforce all of a schema (the backend refuses)
    JsonFixes            its parser without trailing commas or skipped leading whitespace
    ANY_OBJECT_SCHEMA    `json_object` as a schema it enforces

Found by sampling among the allowed tokens at random, as the temperature-1 tests on a random
model do, and checking every completion with jsonschema: its number parser takes malformed
numbers (`1.e5`, and `1e-5` or `-0.5` for an integer), so integers and numbers are refused but
for small ranges (which become enums of their values); it takes `format`, `allOf`, `oneOf` and
unknown keywords without enforcing them, and fails mid-generation on a few shapes (a pattern
beside a length, a schema without a type): refused.
"""

from __future__ import annotations

import sys
from typing import Any

import lmformatenforcer as lmfe
from lmformatenforcer.consts import WHITESPACE_CHARACTERS
from lmformatenforcer.jsonschemaparser import StringParsingState

from engine.structured.json_schema import ANNOTATIONS, keywords_used, subschemas

# Keywords its JSON parser enforces.
ENFORCED_KEYWORDS = ANNOTATIONS | {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "enum", "const", "$ref", "$defs", "definitions", "anyOf", "minLength", "maxLength",
    "pattern",
}  # fmt: skip
# Any JSON object, its values anything but numbers (see the module's docstring).
ANY_OBJECT_SCHEMA: dict[str, Any] = {
    "$defs": {
        "value": {
            "anyOf": [
                {"type": "string"},
                {"type": "boolean"},
                {"type": "null"},
                {"type": "object", "additionalProperties": {"$ref": "#/$defs/value"}},
                {"type": "array", "items": {"$ref": "#/$defs/value"}},
            ]
        }
    },
    "type": "object",
    "additionalProperties": {"$ref": "#/$defs/value"},
}


def unenforced(schema: Any) -> list[str]:
    """Why lm-format-enforcer's JSON parser would not enforce all of `schema` (empty when it
    would, or fail on it mid-generation)."""
    problems = []
    unknown = sorted(keywords_used(schema) - ENFORCED_KEYWORDS)
    if unknown:
        problems.append(f"unsupported keywords {unknown}")
    for node in subschemas(schema):
        problems += _node_problems(node)
    return list(dict.fromkeys(problems))


def _node_problems(node: dict[str, Any]) -> list[str]:
    kinds = node.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    problems = []
    if {"integer", "number"} & set(kinds) and "enum" not in node:
        problems.append("integers and numbers, but for ranges of up to 1024 integers")
    if len(kinds) > 1 and node.keys() - ANNOTATIONS - {"type"}:
        problems.append("keywords beside a list of types")
    for keyword in ("anyOf", "$ref"):
        if keyword in node and node.keys() - ANNOTATIONS - {keyword, "$defs", "definitions"}:
            problems.append(f"keywords beside {keyword}")
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and _is_local_definition(ref)):
        problems.append(f"$ref other than #/$defs/NAME: {ref!r}")
    if "enum" in node and not _plain_values(node["enum"]):
        problems.append("enum values other than all strings or all numbers")
    if "const" in node and not isinstance(node["const"], str):
        problems.append("a const other than a string")
    strings = [*_strings(node.get("enum")), *_strings([node.get("const")])]
    if any(text[:1].isspace() for text in [*strings, *node.get("properties", {})]):
        problems.append("enum, const or property names that start with whitespace (it skips it)")
    if "pattern" in node and {"minLength", "maxLength"} & node.keys():
        problems.append("pattern beside minLength/maxLength")
    if not ({"type", "anyOf", "$ref", "enum", "const"} & node.keys()):
        problems.append("a schema without type, anyOf, $ref, enum or const")
    if node.get("type") == "array" and "items" not in node:
        problems.append("an array without items")
    if node.get("additionalProperties") is False and "properties" not in node:
        problems.append("additionalProperties false without properties")
    return problems


def _is_local_definition(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 3 and parts[0] == "#" and parts[1] in ("$defs", "definitions")


def _strings(values: Any) -> list[str]:
    return [v for v in values if isinstance(v, str)] if isinstance(values, list) else []


def _plain_values(values: Any) -> bool:
    if not isinstance(values, list) or not values:
        return False
    if all(isinstance(v, str) for v in values):
        return True
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


class JsonFixes(lmfe.CharacterLevelParser):
    """lm-format-enforcer's JSON parser with two of its slips closed:

    - it allows `}` right after a `,` where the object could take more properties
      (`{"a": 1,}`): here it does not;
    - it skips a string's leading whitespace (not counted, nor matched against a pattern), so
      `" abc"` passes maxLength 3: here a string does not start with whitespace (its free-text
      token list, which would allow it, is not used for a bounded string's first token).
    """

    def __init__(self, inner: lmfe.JsonSchemaParser) -> None:
        super().__init__(inner.config)
        self.inner = inner

    def add_character(self, new_character: str) -> lmfe.CharacterLevelParser:
        return _with_json_fixes(self.inner.add_character(new_character))

    def get_allowed_characters(self) -> str:
        allowed = self.inner.get_allowed_characters()
        string = self._open_string()
        if string is not None and not string.parsed_string:
            return "".join(c for c in allowed if c not in WHITESPACE_CHARACTERS)
        if string is None and self.inner.last_non_whitespace_character == ",":
            return allowed.replace("}", "")
        return allowed

    def can_end(self) -> bool:
        return self.inner.can_end()

    def shortcut_key(self) -> Any:
        key = self.inner.shortcut_key()
        if isinstance(key, tuple) and key[0] == "json_freetext":
            _, length, _, max_length = key
            if length == 0 and max_length < sys.maxsize:
                return None
        return key

    def _open_string(self) -> StringParsingState | None:
        """The string being parsed (its opening quote seen, not its closing one), if any."""
        stack = self.inner.object_stack
        top = stack[-1] if stack else None
        if isinstance(top, StringParsingState) and top.seen_opening_quote:
            return None if top.seen_closing_quote else top
        return None


def _with_json_fixes(parser: lmfe.CharacterLevelParser) -> lmfe.CharacterLevelParser:
    """`parser` wrapped in `JsonFixes` (each option of a union: the JSON parser forks on
    `anyOf`)."""
    if isinstance(parser, lmfe.JsonSchemaParser):
        return JsonFixes(parser)
    if isinstance(parser, lmfe.UnionParser):
        return lmfe.UnionParser([_with_json_fixes(p) for p in parser.parsers])
    return parser
