"""Structured outputs in the OpenAI API's request bodies: one `StructuredOutputsParams` from
OpenAI's `response_format` (or vLLM's `structural_tag` type of it), vLLM's `structured_outputs`
object, or vLLM's older `guided_*` fields.

Exactly one of them may set the constraint (two at once is a 400 naming the second); the
options (`disable_any_whitespace`, ...) come from `structured_outputs` (or
`guided_whitespace_pattern`) and shape whichever constraint is set. `json_schema`'s `strict` is
accepted either way: the schema is always enforced. The router checks what it can without a
grammar library (shapes, types, JSON text); the worker compiles the grammar, and its complaint
comes back as a 400 that `name_constraint_field` renames to the field the client used.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common.structured_outputs import CONSTRAINTS, StructuredOutputsParams
from router.errors import InvalidRequestError, RouterError
from router.openai.fields import unknown_field
from router.openai.structural_tag import structural_tag

# vLLM's older top-level fields, and the constraint each sets.
GUIDED_ALIASES = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's named schema."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: `text` (no constraint), `json_object` (any JSON object) or
    `json_schema` (the schema in `json_schema.schema`); or vLLM's `structural_tag`, whose
    other fields (`format`, or `structures` and `triggers`) router.openai.structural_tag
    reads."""

    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(BaseModel):
    """vLLM's `structured_outputs` object: the fields of `StructuredOutputsParams`."""

    model_config = ConfigDict(strict=True, extra="forbid")

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def constraints(self) -> list[tuple[str, dict[str, Any]]]:
        """(field, constraint) for each constraint set here."""
        found = []
        for kind in CONSTRAINTS:
            value = getattr(self, "json_" if kind == "json" else kind)
            if kind == "structural_tag" and value is not None:
                value = _structural_tag(value)
            if value is not None and value is not False:
                found.append((f"structured_outputs.{kind}", {kind: value}))
        return found

    def options(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _OPTIONS}


def _structural_tag(value: str | dict[str, Any]) -> str | dict[str, Any]:
    """`structured_outputs.structural_tag` in the form the workers compile (vLLM's legacy
    form converted); what is not a JSON object stays, for StructuredOutputsParams to refuse."""
    try:
        tag = json.loads(value) if isinstance(value, str) else value
    except (json.JSONDecodeError, RecursionError):
        return value
    if not isinstance(tag, dict):
        return value
    return structural_tag(tag, "structured_outputs.structural_tag")[1]


def response_format_constraint(fmt: ResponseFormat | None) -> list[tuple[str, dict[str, Any]]]:
    """(field, constraint) that `response_format` asks for: none for `text`."""
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise InvalidRequestError(
                "response_format.json_schema needs type 'json_schema'", "response_format.type"
            )
        _check_no_extra(fmt)
        return []
    if fmt.type == "structural_tag":
        if fmt.json_schema is not None:
            raise InvalidRequestError(
                "response_format.json_schema needs type 'json_schema'", "response_format.type"
            )
        spec, tag = structural_tag(fmt.model_extra or {}, "response_format")
        return [(f"response_format.{spec}", {"structural_tag": tag})]
    _check_no_extra(fmt)
    if fmt.type == "json_object":
        return [("response_format", {"json_object": True})]
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InvalidRequestError(
            "response_format of type 'json_schema' needs json_schema.schema",
            "response_format.json_schema.schema",
        )
    return [("response_format.json_schema.schema", {"json": fmt.json_schema.schema_})]


def _check_no_extra(fmt: ResponseFormat | None) -> None:
    if fmt is not None and fmt.model_extra:
        name = next(iter(fmt.model_extra))
        raise unknown_field(f"response_format.{name}", ["type", "json_schema"])


def structured_outputs_params(
    constraints: list[tuple[str, dict[str, Any]]], options: dict[str, Any]
) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's StructuredOutputsParams and the field that set its constraint (None,
    None without one). InvalidRequestError for two constraints, options without one, or an
    invalid value (naming the field)."""
    if len(constraints) > 1:
        (first, _), (second, _) = constraints[:2]
        raise InvalidRequestError(
            f"{second!r} and {first!r} both constrain the output (structured outputs); send one",
            second,
        )
    if not constraints:
        asked = [name for name, value in options.items() if value not in (None, False)]
        if asked:
            raise InvalidRequestError(
                f"structured_outputs.{asked[0]} needs a constraint (json, regex, choice, "
                "grammar, json_object or structural_tag)",
                f"structured_outputs.{asked[0]}",
            )
        return None, None
    field, constraint = constraints[0]
    try:
        return StructuredOutputsParams(**constraint, **options), field
    except ValueError as error:
        raise InvalidRequestError(_in_field(field, str(error)), field) from error
    except RecursionError:  # JSON text nested past what json.loads can parse
        raise InvalidRequestError(f"{field}: JSON text nested too deep", field) from None


def name_constraint_field(error: RouterError, field: str | None) -> RouterError:
    """A worker's complaint about the grammar (its param `structured_outputs.<kind>`), said of
    `field`, the request field that set the constraint."""
    if not (field and isinstance(error, InvalidRequestError)):
        return error
    if not (error.param or "").startswith("structured_outputs"):
        return error
    return InvalidRequestError(_in_field(field, error.message), field, error.code)


def _in_field(field: str, message: str) -> str:
    return message if field.startswith("structured_outputs") else f"{field}: {message}"
