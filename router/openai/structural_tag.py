"""Structural tags in request bodies: free text, and wherever the model writes a trigger, a
structure (a begin string, a body that follows a JSON schema, an end string). Each becomes the
xgrammar structural tag the workers compile, `{"type": "structural_tag", "format": {...}}`.

Two forms, as vLLM takes them (in `response_format` of type `structural_tag`, and in
`structured_outputs.structural_tag`):

- xgrammar's: `format` holds one of xgrammar's formats (`triggered_tags`, `tag`, `sequence`,
  `json_schema`, ...) and is passed on as it is;
- the legacy one: `structures` (`[{begin, schema, end}]`) and `triggers`, converted to a
  `triggered_tags` format as xgrammar's `StructuralTag.from_legacy_structural_tag` does (the
  workers' xgrammar compiles only the newer form).

The router checks the legacy form's shape, and the triggers of every `triggered_tags` format:
each a non-empty prefix of some begin, each begin after exactly one trigger (xgrammar fails an
internal check on the first and says the second tersely). The worker compiles the rest.
"""

from __future__ import annotations

from typing import Any

from router.errors import InvalidRequestError
from router.openai.fields import unknown_field

Json = dict[str, Any]
_LEGACY = ("structures", "triggers")
_STRUCTURE = ("begin", "schema", "end")


def structural_tag(value: Json, field: str) -> tuple[str, Json]:
    """The field under `field` that holds the tag's spec (`format` or `structures`), and
    xgrammar's structural tag of `value`, a tag in either form (its `type`, if any, aside).
    InvalidRequestError naming `field.<name>` for a bad shape or trigger."""
    if value.get("type", "structural_tag") != "structural_tag":
        raise InvalidRequestError(f"{field}.type must be 'structural_tag'", f"{field}.type")
    fields = {name: item for name, item in value.items() if name != "type"}
    legacy = [name for name in _LEGACY if name in fields]
    if "format" in fields and legacy:
        raise InvalidRequestError(
            f"{field} takes format (xgrammar's structural tag) or structures and triggers "
            "(vLLM's legacy form), not both",
            f"{field}.{legacy[0]}",
        )
    known = _LEGACY if legacy else ("format",)
    for name in fields:
        if name not in known:
            raise unknown_field(f"{field}.{name}", [f"{field}.{k}" for k in ("type", *known)])
    if legacy:
        return "structures", legacy_structural_tag(
            fields.get("structures"), fields.get("triggers"), field
        )
    fmt = fields.get("format")
    if fmt is None:
        raise InvalidRequestError(
            f"{field} needs format (xgrammar's structural tag) or structures and triggers "
            "(vLLM's legacy form)",
            f"{field}.format",
        )
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidRequestError(
            f"{field}.format must be one of xgrammar's structural tag formats (an object with a "
            "type: triggered_tags, tag, sequence, ...)",
            f"{field}.format",
        )
    check_triggered_tags(fmt, f"{field}.format")
    return "format", {"type": "structural_tag", "format": fmt}


def legacy_structural_tag(structures: Any, triggers: Any, field: str) -> Json:
    """xgrammar's structural tag of vLLM's legacy form: free text until one of `triggers`, then
    one of `structures` (a tag with a JSON-schema body), then free text again."""
    if not isinstance(structures, list) or not structures:
        raise InvalidRequestError(
            f"{field}.structures must be a non-empty list of {{begin, schema, end}} objects",
            f"{field}.structures",
        )
    if not isinstance(triggers, list) or not triggers:
        raise InvalidRequestError(
            f"{field}.triggers must be a non-empty list of strings", f"{field}.triggers"
        )
    tags = [_legacy_tag(item, f"{field}.structures.{i}") for i, item in enumerate(structures)]
    begins = [tag["begin"] for tag in tags]
    check_triggers(triggers, begins, f"{field}.triggers", f"{field}.structures")
    fmt = {"type": "triggered_tags", "triggers": triggers, "tags": tags}
    return {"type": "structural_tag", "format": fmt}


def _legacy_tag(structure: Any, path: str) -> Json:
    if not isinstance(structure, dict):
        raise InvalidRequestError(f"{path} must be an object with begin, schema and end", path)
    for name in structure:
        if name not in _STRUCTURE:
            raise unknown_field(f"{path}.{name}", [f"{path}.{k}" for k in _STRUCTURE])
    begin, schema, end = (structure.get(name) for name in _STRUCTURE)
    if not isinstance(begin, str) or not begin:
        raise InvalidRequestError(f"{path}.begin must be a non-empty string", f"{path}.begin")
    if not isinstance(schema, dict):
        message = f"{path}.schema must be a JSON schema (an object)"
        raise InvalidRequestError(message, f"{path}.schema")
    if not isinstance(end, str):
        raise InvalidRequestError(f"{path}.end must be a string", f"{path}.end")
    content = {"type": "json_schema", "json_schema": schema}
    return {"type": "tag", "begin": begin, "content": content, "end": end}


def check_triggers(triggers: list[Any], begins: list[str], at: str, tags_at: str) -> None:
    """InvalidRequestError unless each of `triggers` (the list at `at`) is a non-empty string
    that some begin starts with, and each of `begins` (of the tags at `tags_at`) starts with
    exactly one trigger."""
    for i, trigger in enumerate(triggers):
        if not isinstance(trigger, str) or not trigger:
            raise InvalidRequestError(f"{at}.{i} must be a non-empty string", f"{at}.{i}")
        if not any(begin.startswith(trigger) for begin in begins):
            raise InvalidRequestError(
                f"{at}.{i}: no begin starts with the trigger {trigger!r} (each trigger must be "
                "a prefix of some begin)",
                f"{at}.{i}",
            )
    for i, begin in enumerate(begins):
        matched = [trigger for trigger in triggers if begin.startswith(trigger)]
        if len(matched) != 1:
            said = f"{len(matched)} ({', '.join(map(repr, matched))})" if matched else "none"
            raise InvalidRequestError(
                f"{tags_at}.{i}.begin: {begin!r} starts with {said} of the triggers; each "
                "begin must start with exactly one",
                f"{tags_at}.{i}.begin",
            )


def check_triggered_tags(fmt: Json, path: str) -> None:
    """`check_triggers` for each `triggered_tags` format within `fmt` (at `path`) whose
    triggers are a list and whose tags all have string begins; xgrammar judges the rest."""
    stack: list[tuple[Any, str]] = [(fmt, path)]
    while stack:
        node, at = stack.pop()
        if isinstance(node, list):
            stack.extend((item, f"{at}.{i}") for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        tags, triggers = node.get("tags"), node.get("triggers")
        if node.get("type") == "triggered_tags" and isinstance(tags, list) and tags:
            begins = [tag.get("begin") for tag in tags if isinstance(tag, dict)]
            strings = [begin for begin in begins if isinstance(begin, str)]
            if isinstance(triggers, list) and len(strings) == len(tags):
                check_triggers(triggers, strings, f"{at}.triggers", f"{at}.tags")
        # a JSON schema is no format (its values may look like one)
        stack.extend((item, f"{at}.{key}") for key, item in node.items() if key != "json_schema")
