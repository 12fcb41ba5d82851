"""Structured outputs in `baton bench`: which requests carry a constraint, and whether the answers
kept it.

    --structured-output SPEC         json-example | regex-example | choice-example | FILE
    --structured-output-ratio R      the share of requests that carry it (default 1)

FILE holds a JSON schema, or a vLLM `structured_outputs` object (one of json, regex, choice,
grammar, json_object, structural_tag, with its options). As in vLLM's
`benchmark_serving_structured_output`, the requests that carry the constraint are a seeded
sample of round(R * N) of the N (the same ones for the same seed), whatever the workload.

On the wire: over HTTP a bare JSON schema goes as OpenAI's `response_format` (`json_schema`),
which vLLM and SGLang take too; any other constraint, or one with options, as vLLM's
`structured_outputs` object. Over gRPC it is `SamplingParams.structured_outputs` (field 21). A
structured request never ignores EOS: its answer ends where the grammar does, or at max_tokens.

After a run each structured answer is checked, cheaply: against the JSON schema with
`jsonschema` (when installed), a regex with Python's `re.fullmatch`, a choice by equality. A
truncated answer (max_tokens came first) is invalid; other constraints are not checked.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.records import RequestRecord
from bench.workload import BenchRequest
from common.structured_outputs import CONSTRAINTS, StructuredOutputsParams

# A person record: bounded strings and integers, so even a random model's answer ends soon.
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 16},
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
    },
    "required": ["name", "age", "city", "id"],
    "additionalProperties": False,
}
EXAMPLES: dict[str, dict[str, Any]] = {
    "json-example": {"json": PERSON_SCHEMA},
    "regex-example": {"regex": r"[A-Z][a-z]{1,12} [0-9]{1,3}"},
    "choice-example": {"choice": ["positive", "negative", "neutral"]},
}
OPTION_DEFAULTS: dict[str, Any] = {
    "disable_any_whitespace": False,
    "disable_additional_properties": False,
    "whitespace_pattern": None,
}
_FIELDS = frozenset(CONSTRAINTS) | OPTION_DEFAULTS.keys()


def load_constraint(spec: str) -> StructuredOutputsParams:
    """The constraint `spec` names: an example's name or a FILE (see the module docstring).
    ValueError with what is wrong."""
    if spec in EXAMPLES:
        return StructuredOutputsParams(**EXAMPLES[spec])
    path = Path(spec)
    if not path.is_file():
        raise ValueError(
            f"--structured-output: {spec!r} is neither {', '.join(EXAMPLES)} nor a file"
        )
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--structured-output: cannot read JSON from {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--structured-output: {path} must hold a JSON object")
    if value.keys() <= _FIELDS and value.keys() & set(CONSTRAINTS):
        return StructuredOutputsParams(**value)  # a structured_outputs object
    return StructuredOutputsParams(json=value)  # a JSON schema


@dataclass(frozen=True, slots=True)
class StructuredOutputSpec:
    """The constraint, where it came from (`source`), and the share of requests (0-1) that
    carry it."""

    params: StructuredOutputsParams
    source: str
    ratio: float = 1.0

    @classmethod
    def from_args(cls, spec: str, ratio: float) -> StructuredOutputSpec:
        if not 0 <= ratio <= 1:
            raise ValueError(f"--structured-output-ratio must be in [0, 1], got {ratio}")
        return cls(load_constraint(spec), spec, ratio)

    def chosen(self, num_requests: int, seed: int) -> set[int]:
        """Positions (0..num_requests-1) of the requests that carry the constraint."""
        count = round(self.ratio * num_requests)
        return set(random.Random(seed).sample(range(num_requests), count))

    def apply(self, requests: Sequence[BenchRequest], seed: int) -> list[BenchRequest]:
        """`requests` with the chosen ones carrying the constraint."""
        chosen = self.chosen(len(requests), seed)
        return [
            replace(r, structured_outputs=self.params) if i in chosen else r
            for i, r in enumerate(requests)
        ]

    def describe(self) -> dict[str, Any]:
        params = self.params
        return {
            "source": self.source,
            "ratio": self.ratio,
            "kind": params.kind,
            "constraint": getattr(params, params.kind),
            "http_fields": sorted(http_fields(params)),
            "ignore_eos": False,
        }


def http_fields(params: StructuredOutputsParams) -> dict[str, Any]:
    """The request-body fields that carry `params`: `response_format` for a bare JSON schema,
    else vLLM's `structured_outputs` object (the constraint and the options not at default)."""
    options = {
        name: getattr(params, name)
        for name, default in OPTION_DEFAULTS.items()
        if getattr(params, name) != default
    }
    if params.kind == "json" and not options:
        schema = params.json if isinstance(params.json, dict) else json.loads(str(params.json))
        json_schema = {"name": "bench", "schema": schema}
        return {"response_format": {"type": "json_schema", "json_schema": json_schema}}
    return {"structured_outputs": {params.kind: getattr(params, params.kind), **options}}


def answer_is_valid(params: StructuredOutputsParams, text: str) -> bool | None:
    """Whether `text` keeps the constraint; None when it is not checked (a grammar, a
    structural tag, or a JSON schema without `jsonschema` installed)."""
    kind = params.kind
    if kind == "choice":
        return text in (params.choice or [])
    if kind == "regex":
        try:
            return re.fullmatch(str(params.regex), text) is not None
        except re.error:  # a pattern only the grammar backend reads
            return None
    if kind not in ("json", "json_object"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return False
    if kind == "json_object":
        return isinstance(value, dict)
    try:
        import jsonschema
    except ImportError:
        return None
    schema = params.json if isinstance(params.json, dict) else json.loads(str(params.json))
    return jsonschema.validators.validator_for(schema)(schema).is_valid(value)


def check_answers(requests: Sequence[BenchRequest], records: Sequence[RequestRecord]) -> None:
    """Mark each record whose request carried a constraint, and whether its answer kept it."""
    by_index = {r.index: r for r in requests}
    for record in records:
        request = by_index.get(record.index)
        if request is None or request.structured_outputs is None:
            continue
        record.structured = True
        if record.success:
            record.structured_valid = answer_is_valid(request.structured_outputs, record.text)


def structured_summary(records: Sequence[RequestRecord]) -> dict[str, int] | None:
    """Counts of structured requests and of their answers: valid, invalid, unchecked (failed
    requests are none of these); None when no request was structured."""
    marked = [r for r in records if r.structured]
    if not marked:
        return None
    ok = [r for r in marked if r.success]
    return {
        "requests": len(marked),
        "valid": sum(r.structured_valid is True for r in ok),
        "invalid": sum(r.structured_valid is False for r in ok),
        "unchecked": sum(r.structured_valid is None for r in ok),
    }
