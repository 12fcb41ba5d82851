"""What a chat request's `tools`, `tool_choice` and `parallel_tool_calls` ask of generation.

- `none`: the template renders the tools (unless the server excludes them); no parsing.
- `auto`: the server's tool parser reads calls from the answer; with a `strict` tool (or the
  server's `--strict-tool-calls`) a structural tag in the parser's format constrains each
  call's arguments to its tool's schema, while free text stays free.
- `required` / named: the answer is constrained to a JSON array of `{name, arguments}` objects
  (anyOf over the tools, or the named one only; at most one when `parallel_tool_calls` is
  false), so every call parses and validates; it is read back as calls with finish reason
  `tool_calls`. This needs no parser and works with any model and template (vLLM's way).

Errors are 400s naming the field: `tools.{i}.function.parameters`, `tool_choice`, ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from common.tools.errors import ToolRequestError
from common.tools.json_array import JsonArrayToolParser
from common.tools.parser import ToolParser, tool_parser_class
from common.tools.settings import ToolSettings

Json = dict[str, Any]
NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
FUNCTION_FIELDS = ("name", "description", "parameters", "strict")
EMPTY_PARAMETERS: Json = {"type": "object", "properties": {}}


@dataclass(slots=True)
class ToolPlan:
    """One request's tool handling: the tools the template renders, the parser that reads
    calls (None: none), the most calls kept, and the structured-outputs constraint
    `(field, constraint)` it adds (None: none)."""

    template_tools: list[Json] | None = None
    parser: ToolParser | None = None
    max_calls: int | None = None
    constraint: tuple[str, Json] | None = None


def plan_tools(
    tools: list[Json] | None,
    tool_choice: str | Json | None,
    parallel_tool_calls: bool | None,
    settings: ToolSettings,
) -> ToolPlan:
    """The plan for a request (ToolRequestError naming the field for a bad one)."""
    tools = check_tools(tools or [])
    choice = _choice(tool_choice, tools)
    parallel = parallel_tool_calls is not False
    if choice == "none":
        shown = None if settings.exclude_tools_when_tool_choice_none else tools or None
        return ToolPlan(template_tools=shown)
    if choice == "auto":
        return _auto(tools, parallel, settings)
    only = None if choice == "required" else choice
    schema = calls_schema(tools, only, parallel)
    return ToolPlan(
        template_tools=tools,
        parser=JsonArrayToolParser(tools),
        max_calls=None if parallel else 1,
        constraint=("tool_choice", {"json": schema}),
    )


def check_tools(tools: list[Any]) -> list[Json]:
    """`tools` checked: function tools with valid names (each once) and JSON-schema
    parameters."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        at = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ToolRequestError(f"{at}.type must be 'function'", f"{at}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise ToolRequestError(f"{at}.function must be an object", f"{at}.function")
        for key in function:
            if key not in FUNCTION_FIELDS:
                raise ToolRequestError(f"{at}.function.{key}: unknown field",
                                          f"{at}.function.{key}", "unknown_parameter")  # fmt: skip
        name = function.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ToolRequestError(
                f"{at}.function.name must be 1 to 64 letters, digits, '_', '.' or '-'",
                f"{at}.function.name",
            )
        if name in seen:
            raise ToolRequestError(f"{at}.function.name: {name!r} is given twice",
                                      f"{at}.function.name")  # fmt: skip
        seen.add(name)
        _check_function(function, f"{at}.function")
    return tools


def _check_function(function: Json, at: str) -> None:
    if not isinstance(function.get("description", ""), str):
        raise ToolRequestError(f"{at}.description must be a string", f"{at}.description")
    if not isinstance(function.get("strict", False), bool):
        raise ToolRequestError(f"{at}.strict must be a boolean", f"{at}.strict")
    parameters = function.get("parameters", EMPTY_PARAMETERS)
    if not isinstance(parameters, dict):
        raise ToolRequestError(f"{at}.parameters must be a JSON schema (an object)",
                                  f"{at}.parameters")  # fmt: skip
    try:
        jsonschema.validators.validator_for(parameters).check_schema(parameters)
    except jsonschema.SchemaError as error:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        raise ToolRequestError(
            f"{at}.parameters is not a valid JSON schema at {where}: {error.message}",
            f"{at}.parameters",
        ) from None
    if parameters.get("type", "object") != "object":
        raise ToolRequestError(f"{at}.parameters must describe an object (type 'object')",
                                  f"{at}.parameters")  # fmt: skip


def _choice(tool_choice: str | Json | None, tools: list[Json]) -> str:
    """"none", "auto", "required" or the named tool's name (OpenAI's default: auto with
    tools, none without)."""
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ToolRequestError(
                f"tool_choice must be 'none', 'auto', 'required' or a named function, "
                f"got {tool_choice!r}",
                "tool_choice",
            )
        if tool_choice != "none" and not tools:
            raise ToolRequestError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        return tool_choice
    function = tool_choice.get("function")
    if tool_choice.get("type") != "function" or not isinstance(function, dict):
        raise ToolRequestError(
            'a named tool_choice is {"type": "function", "function": {"name": ...}}',
            "tool_choice",
        )
    name = function.get("name")
    if name not in {t["function"]["name"] for t in tools}:
        raise ToolRequestError(
            f"tool_choice.function.name: {name!r} is not one of the request's tools",
            "tool_choice.function.name",
        )
    return str(name)


def _auto(tools: list[Json], parallel: bool, settings: ToolSettings) -> ToolPlan:
    if not (settings.enable_auto_tool_choice and settings.tool_call_parser):
        raise ToolRequestError(
            "tool_choice 'auto' (OpenAI's default with tools) needs a server started with "
            "--enable-auto-tool-choice and --tool-call-parser; send tool_choice 'none', "
            "'required' or a named function otherwise",
            "tool_choice",
        )
    parser = tool_parser_class(settings.tool_call_parser)(tools)
    plan = ToolPlan(template_tools=tools, parser=parser, max_calls=None if parallel else 1)
    strict = [i for i, t in enumerate(tools) if t["function"].get("strict")]
    if strict or settings.strict_tool_calls:
        plan.constraint = ("tools", strict_tag(parser, tools, parallel, strict[:1]))
    return plan


def strict_tag(parser: ToolParser, tools: list[Json], parallel: bool, strict: list[int]) -> Json:
    """The structural tag that constrains each call's arguments to its tool's schema (any
    object for tools without `strict` unless the server makes all strict)."""
    tags = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = function.get("parameters", EMPTY_PARAMETERS)
        if strict and not function.get("strict"):
            schema = {"type": "object"}
        tag = parser.tag(function["name"], schema)
        if tag is None:
            field = f"tools.{strict[0] if strict else i}.function.strict"
            raise ToolRequestError(
                f"{field}: the {parser.name or 'server'}'s tool call format has no structural "
                "tag form (hermes, llama3_json and mistral have one), so strict calls cannot be "
                "enforced",
                field,
                "unsupported_parameter",
            )
        tags.append(tag)
    assert parser.trigger is not None
    fmt = {"type": "triggered_tags", "triggers": [parser.trigger], "tags": tags,
           "stop_after_first": not parallel}  # fmt: skip
    return {"structural_tag": {"type": "structural_tag", "format": fmt}}


def calls_schema(tools: list[Json], only: str | None, parallel: bool) -> Json:
    """The JSON schema of `required` / named answers: an array of one or more (at most one
    unless `parallel`) `{"name": N, "arguments": ...}` objects, N one of the tools (or `only`),
    the arguments following its parameters."""
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "arguments": t["function"].get("parameters", EMPTY_PARAMETERS),
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if only is None or t["function"]["name"] == only
    ]
    schema: Json = {"type": "array", "minItems": 1,
                    "items": items[0] if len(items) == 1 else {"anyOf": items}}  # fmt: skip
    if not parallel:
        schema["maxItems"] = 1
    return schema
