"""bench.structured: the constraint from an example or a file, how it goes on the wire, which
requests carry it, and the check of the answers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bench.client import ClientOptions
from bench.grpc_client import BatonGrpcClient
from bench.http_client import OpenAIClient
from bench.records import RequestRecord
from bench.structured import (
    PERSON_SCHEMA,
    StructuredOutputSpec,
    answer_is_valid,
    check_answers,
    http_fields,
    load_constraint,
    structured_summary,
)
from bench.workload import BenchRequest
from common.structured_outputs import StructuredOutputsParams
from proto.convert import structured_from_proto


def test_examples_and_files(tmp_path: Path) -> None:
    assert load_constraint("json-example").json == PERSON_SCHEMA
    assert load_constraint("choice-example").kind == "choice"
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "string"}}}))
    assert load_constraint(str(schema)).kind == "json"
    body = tmp_path / "so.json"
    body.write_text(json.dumps({"json_object": True, "disable_any_whitespace": True}))
    loaded = load_constraint(str(body))
    assert (loaded.kind, loaded.json_object, loaded.disable_any_whitespace) == (
        "json_object", True, True
    )
    with pytest.raises(ValueError, match="neither"):
        load_constraint(str(tmp_path / "missing.json"))
    body.write_text(json.dumps({"regex": "a", "choice": ["b"]}))  # two constraints
    with pytest.raises(ValueError, match="exactly one"):
        load_constraint(str(body))


def test_http_fields() -> None:
    """A bare schema as OpenAI's response_format; anything else as structured_outputs."""
    bare = http_fields(StructuredOutputsParams(json=PERSON_SCHEMA))
    assert bare == {"response_format": {"type": "json_schema", "json_schema": {
        "name": "bench", "schema": PERSON_SCHEMA}}}  # fmt: skip
    compact = StructuredOutputsParams(json=PERSON_SCHEMA, disable_any_whitespace=True)
    assert http_fields(compact) == {
        "structured_outputs": {"json": PERSON_SCHEMA, "disable_any_whitespace": True}
    }
    choice = StructuredOutputsParams(choice=["a", "b"])
    assert http_fields(choice) == {"structured_outputs": {"choice": ["a", "b"]}}


def test_clients_send_the_constraint_without_ignore_eos() -> None:
    params = StructuredOutputsParams(regex="[0-9]+")
    structured = BenchRequest(0, [5, 6, 7], 8, structured_outputs=params)
    plain = BenchRequest(1, [5, 6, 7], 8)

    async def build() -> tuple[Any, ...]:  # the clients belong to an event loop
        http = OpenAIClient("http://127.0.0.1:9", ClientOptions(ignore_eos=True))
        grpc = BatonGrpcClient("127.0.0.1:9", ClientOptions(ignore_eos=True))
        try:
            return (http.body(structured)[1], http.body(plain)[1], grpc.message(structured),
                    grpc.message(plain))  # fmt: skip
        finally:
            await http.aclose()
            await grpc.aclose()

    body, plain_body, message, plain_message = asyncio.run(build())
    assert body["structured_outputs"] == {"regex": "[0-9]+"} and "ignore_eos" not in body
    assert plain_body["ignore_eos"] is True
    assert not message.params.ignore_eos
    assert structured_from_proto(message.params.structured_outputs) == params
    assert not plain_message.params.HasField("structured_outputs")


def test_the_seed_picks_the_structured_requests() -> None:
    spec = StructuredOutputSpec.from_args("choice-example", 0.25)
    requests = [BenchRequest(i, [5], 4) for i in range(8)]
    first = spec.apply(requests, seed=1)
    assert sum(r.structured_outputs is not None for r in first) == 2
    again = spec.apply(requests, seed=1)
    assert [r.structured_outputs for r in again] == [r.structured_outputs for r in first]
    assert all(r.structured_outputs is None for r in requests)  # the inputs are left alone
    with pytest.raises(ValueError, match="ratio"):
        StructuredOutputSpec.from_args("choice-example", 1.5)


def test_answers_are_checked() -> None:
    person = StructuredOutputsParams(json=PERSON_SCHEMA)
    good = {"name": "Ada", "age": 36, "city": "London", "id": 1}
    assert answer_is_valid(person, json.dumps(good)) is True
    assert answer_is_valid(person, json.dumps({**good, "age": 200})) is False
    assert answer_is_valid(person, json.dumps(good)[:-1]) is False  # truncated
    assert answer_is_valid(StructuredOutputsParams(regex="[0-9]+"), "123") is True
    assert answer_is_valid(StructuredOutputsParams(choice=["a"]), "b") is False
    assert answer_is_valid(StructuredOutputsParams(grammar='root ::= "a"'), "a") is None

    choice = StructuredOutputsParams(choice=["yes", "no"])
    requests = [BenchRequest(0, "q", 4, structured_outputs=choice), BenchRequest(1, "q", 4),
                BenchRequest(2, "q", 4, structured_outputs=choice)]  # fmt: skip
    records = [RequestRecord(0, success=True, text="yes"), RequestRecord(1, success=True),
               RequestRecord(2, error="HTTP 500")]  # fmt: skip
    check_answers(requests, records)
    assert [(r.structured, r.structured_valid) for r in records] == [
        (True, True), (False, None), (True, None)]  # fmt: skip
    assert structured_summary(records) == {"requests": 2, "valid": 1, "invalid": 0,
                                           "unchecked": 0}  # fmt: skip
    assert structured_summary(records[1:2]) is None
