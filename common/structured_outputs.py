"""`StructuredOutputsParams`: the format a request's output must follow, as vLLM spells it.

Exactly one constraint is set: `json` (a JSON schema, dict or JSON text), `regex`, `choice`
(a list of strings), `grammar` (EBNF/GBNF, or Lark through the guidance backend),
`json_object` (any JSON object) or `structural_tag` (xgrammar's: free text until a trigger, then
a schema-exact body; a dict or JSON text). Torch-free: the router validates with it too.
A bad value raises `ValueError` naming the field (`structured_outputs.<field>`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

JSON_KINDS = ("json", "json_object")
JSON_OPTIONS = ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")
CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(slots=True)
class StructuredOutputsParams:
    """One output constraint and the options that shape it.

    `disable_any_whitespace`: JSON without free whitespace between tokens (compact output).
    `disable_additional_properties`: objects of a JSON schema take only the listed properties
    unless the schema says otherwise (guidance; xgrammar is always strict so).
    `whitespace_pattern`: the regex of whitespace allowed in JSON (guidance, outlines).
    `reasoning_end`: token ids that end a reasoning model's thinking (e.g. `</think>`'s); the
    constraint applies only after the output contains them (empty: from the first token).
    """

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    reasoning_end: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        named = [name for name in CONSTRAINTS if self._is_set(name)]
        if len(named) != 1:
            raise ValueError(
                "structured_outputs: set exactly one of "
                f"{', '.join(CONSTRAINTS)}; got {', '.join(named) if named else 'none'}"
            )
        self._validate_types()
        if isinstance(self.reasoning_end, str) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.reasoning_end
        ):
            raise ValueError("structured_outputs.reasoning_end must be a list of token ids")
        self.reasoning_end = tuple(self.reasoning_end)

    def _is_set(self, name: str) -> bool:
        value = getattr(self, name)
        return value is not None and value is not False

    def _validate_types(self) -> None:
        self.json = _json_value("json", self.json)
        self.structural_tag = _json_value("structural_tag", self.structural_tag)
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a list of strings")
            self.choice = list(self.choice)
            if not self.choice:
                raise ValueError("structured_outputs.choice must not be empty")
        if self.json_object is not None and not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be a bool")
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"structured_outputs.{name} must be a bool")
        kind = self.kind
        if kind not in JSON_KINDS:  # refused, never silently ignored
            for name in JSON_OPTIONS:
                if self._is_set(name):
                    raise ValueError(
                        f"structured_outputs.{name} applies to json and json_object only "
                        f"(the constraint here is {kind})"
                    )

    @property
    def kind(self) -> str:
        """The name of the constraint that is set (one of `CONSTRAINTS`)."""
        return next(name for name in CONSTRAINTS if self._is_set(name))

    def spec_text(self) -> str:
        """The constraint as one string: JSON text for json/structural_tag/choice, the pattern or
        grammar itself otherwise. With `kind` and the options it keys the compile cache."""
        value = getattr(self, self.kind)
        if isinstance(value, dict | list):
            return json.dumps(value, sort_keys=True)
        return "" if isinstance(value, bool) else str(value)

    def cache_key(self) -> tuple[str, str, bool, bool, str | None]:
        """What decides the compiled grammar: the constraint and the options."""
        return (
            self.kind,
            self.spec_text(),
            self.disable_any_whitespace,
            self.disable_additional_properties,
            self.whitespace_pattern,
        )


def _json_value(name: str, value: Any) -> str | dict[str, Any] | None:
    """A dict, or JSON text of an object (checked to parse); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs.{name} is not valid JSON: {e}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"structured_outputs.{name} must be a JSON object")
        return value
    if not isinstance(value, dict):
        raise ValueError(f"structured_outputs.{name} must be a dict or a JSON string")
    return value
