"""JSON-schema walks the backends share: which keywords a schema uses, and rewrites that keep
its meaning in a form a backend enforces.

    enforceable_schema(params, ...)     a `json` / `json_object` spec's schema as a backend
                                        that builds it into a regex takes it, or refused
    keywords_used(schema)               every keyword, at any depth (not property names)
    map_subschemas(schema, rewrite)     `rewrite` applied to every subschema, innermost first
    without_additional_properties       objects take only their listed properties
    bounded_integers_as_enums           {"type": "integer", "minimum": 1, "maximum": 3}
                                        -> {"enum": [1, 2, 3]} (small ranges only)

A backend refuses the keywords it would not enforce (rather than compile them and let through
what the schema forbids); `auto` then tries the next backend.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from common.structured_outputs import StructuredOutputsParams
from engine.structured.backend import GrammarCompileError

VALUE_KEYWORDS = ("enum", "const", "default", "examples")  # hold values, not schemas
SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")  # name -> schema
# Keywords that describe and constrain nothing.
ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated"}
    | {"readOnly", "writeOnly"}
)
# An integer range of at most this many values may become an enum of them.
MAX_ENUM_RANGE = 1024

Schema = Any  # a dict, or a list of schemas, or a bool (true/false schemas)


def enforceable_schema(
    params: StructuredOutputsParams,
    backend: str,
    any_object: Schema,
    unenforced: Callable[[Schema], list[str]],
) -> Schema:
    """The schema `backend` compiles for a `json` or `json_object` spec: `any_object` (the
    backend's form of `json_object`), or the spec's schema (a dict or JSON text) with small
    integer ranges as enums (`bounded_integers_as_enums`) and, with
    disable_additional_properties, its objects closed.

    GrammarCompileError naming `backend` for `json_object` with disable_additional_properties
    (only `{}` would match), and with the reasons `unenforced` gives for the schema (why the
    backend would not enforce all of it); JSON text that does not parse raises json's error.
    """
    if params.kind == "json_object":
        if params.disable_additional_properties:
            reason = "disable_additional_properties with json_object would allow only {}"
            raise GrammarCompileError(params, backend, reason)
        return any_object
    raw = params.json
    schema = raw if isinstance(raw, dict) else json.loads(str(raw))
    schema = bounded_integers_as_enums(schema)
    if params.disable_additional_properties:
        schema = without_additional_properties(schema)
    problems = unenforced(schema)
    if problems:
        raise GrammarCompileError(params, backend, "; ".join(problems))
    return schema


def keywords_used(schema: Schema) -> set[str]:
    """Every keyword used anywhere in `schema`: the keys of its subschemas, not the names in
    `properties` or `$defs`, nor anything inside `enum`, `const` or `default` values."""
    found: set[str] = set()
    if isinstance(schema, list):
        for item in schema:
            found |= keywords_used(item)
    elif isinstance(schema, dict):
        for key, value in schema.items():
            found.add(key)
            if key in SCHEMA_MAPS:
                for sub in value.values() if isinstance(value, dict) else ():
                    found |= keywords_used(sub)
            elif key not in VALUE_KEYWORDS:
                found |= keywords_used(value)
    return found


def subschemas(schema: Schema) -> list[dict[str, Any]]:
    """Every subschema of `schema` that is an object, `schema` itself first."""
    if isinstance(schema, list):
        return [sub for item in schema for sub in subschemas(item)]
    if not isinstance(schema, dict):
        return []
    found = [schema]
    for key, value in schema.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            found += [sub for item in value.values() for sub in subschemas(item)]
        elif key not in VALUE_KEYWORDS:
            found += subschemas(value)
    return found


def map_subschemas(schema: Schema, rewrite: Callable[[dict[str, Any]], Schema]) -> Schema:
    """A copy of `schema` with `rewrite` applied to every subschema (a dict), innermost first;
    values (`enum`, `const`, `default`, `examples`) are left as they are."""
    if isinstance(schema, list):
        return [map_subschemas(item, rewrite) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in VALUE_KEYWORDS:
            out[key] = value
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: map_subschemas(sub, rewrite) for name, sub in value.items()}
        else:
            out[key] = map_subschemas(value, rewrite)
    return rewrite(out)


def without_additional_properties(schema: Schema) -> Schema:
    """A copy of `schema` in which every object that says nothing of `additionalProperties`
    allows none."""

    def close(node: dict[str, Any]) -> dict[str, Any]:
        is_object = node.get("type") == "object" or "properties" in node
        if is_object and "additionalProperties" not in node:
            return {**node, "additionalProperties": False}
        return node

    return map_subschemas(schema, close)


def bounded_integers_as_enums(schema: Schema, limit: int = MAX_ENUM_RANGE) -> Schema:
    """A copy of `schema` in which every integer with both bounds (`minimum`/`exclusiveMinimum`
    and `maximum`/`exclusiveMaximum`, `multipleOf` too) and at most `limit` values is the enum
    of those values: the same instances, for backends that enforce enums but not bounds."""
    return map_subschemas(schema, lambda node: _integer_enum(node, limit))


_INTEGER_KEYWORDS = frozenset(
    {"type", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}
)


def _integer_enum(node: dict[str, Any], limit: int) -> dict[str, Any]:
    constraining = node.keys() - ANNOTATIONS
    if node.get("type") != "integer" or not constraining <= _INTEGER_KEYWORDS:
        return node
    given = {k: node[k] for k in constraining - {"type"}}
    if not all(_is_number(v) for v in given.values()) or given.get("multipleOf", 1) <= 0:
        return node  # draft-4 boolean exclusives and the like: left to be refused
    lows = [math.ceil(given["minimum"])] if "minimum" in given else []
    lows += [math.floor(given["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in given else []
    highs = [math.floor(given["maximum"])] if "maximum" in given else []
    highs += [math.ceil(given["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in given else []
    if not lows or not highs or not 0 < min(highs) - max(lows) + 1 <= limit:
        return node
    step = given.get("multipleOf")
    values = [v for v in range(max(lows), min(highs) + 1) if step is None or v % step == 0]
    return {"enum": values} if values else node


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
