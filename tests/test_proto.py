"""The service contracts: stubs current, messages round-trip the engine's types."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from common.structured_outputs import StructuredOutputsParams
from engine.sampling_params import SamplingParams
from proto.convert import params_from_proto, params_to_proto
from proto.generate import PACKAGE_DIR, generate, without_generator_versions


def test_committed_stubs_are_current(tmp_path: Path):
    written = generate(out_root=tmp_path)
    assert written, "protoc wrote nothing"
    for fresh in written:
        committed = PACKAGE_DIR / fresh.name
        assert committed.is_file(), f"{fresh.name} is not committed: run python -m proto.generate"
        assert without_generator_versions(committed.read_text()) == without_generator_versions(
            fresh.read_text()
        ), f"{fresh.name} is stale: run python -m proto.generate"


def test_the_stub_check_ignores_only_the_generators_versions():
    stub = (PACKAGE_DIR / "common_pb2.py").read_text()
    bumped = re.sub(r"# Protobuf Python Version: [\d.]+", "# Protobuf Python Version: 7.99.9", stub)
    bumped = re.sub(r"(Domain\.PUBLIC,\s*)\d+,\s*\d+,\s*\d+,", r"\g<1>7,\n    99,\n    9,", bumped)
    assert bumped != stub
    assert without_generator_versions(bumped) == without_generator_versions(stub)
    grpc_stub = (PACKAGE_DIR / "router_pb2_grpc.py").read_text()
    bumped = re.sub(
        r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '1.99.9'", grpc_stub
    )
    assert bumped != grpc_stub
    assert without_generator_versions(bumped) == without_generator_versions(grpc_stub)
    edited = stub.replace("SamplingParams", "SamplingParam")
    assert without_generator_versions(edited) != without_generator_versions(stub)


# One of each constraint, with and without options (dicts and JSON text both).
STRUCTURED: list[dict[str, Any]] = [
    {"json": {"type": "object", "properties": {"a": {"type": "integer", "maximum": 5}}}},
    {"json": '{"type": "string", "maxLength": 3}', "disable_any_whitespace": True},
    {"regex": "[a-c]{1,3}"},
    {"json_object": True, "whitespace_pattern": " ?", "disable_additional_properties": True},
    {"choice": ["yes", "no", ""]},
    {"grammar": 'root ::= "a" | "b"'},
    {"json_object": True},
    {
        "structural_tag": {
            "type": "structural_tag",
            "format": {"type": "const_string", "value": "x"},
        }
    },
    {"structural_tag": '{"type": "structural_tag"}'},
]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=11, max_tokens=9),
        SamplingParams(
            presence_penalty=0.3,
            frequency_penalty=-0.2,
            repetition_penalty=1.1,
            stop=["\n\n", "END"],
            stop_token_ids=[5, 6],
            ignore_eos=True,
            min_tokens=2,
            logprobs=3,
            logit_bias={7: -1.5},
            allowed_token_ids=[1, 2, 3],
            skip_special_tokens=False,
            include_stop_str_in_output=True,
        ),
        *(
            SamplingParams(temperature=1.0, structured_outputs=StructuredOutputsParams(**so))
            for so in STRUCTURED
        ),
    ],
)
def test_sampling_params_round_trip_exactly(params):
    assert params_from_proto(params_to_proto(params)) == params


def test_a_dict_schema_comes_back_a_dict_and_text_comes_back_text():
    for schema in ({"type": "integer"}, '{"type": "integer"}'):
        params = SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))
        back = params_from_proto(params_to_proto(params)).structured_outputs
        assert back is not None and back.json == schema and type(back.json) is type(schema)


def test_a_bad_structured_outputs_message_names_the_field():
    msg = params_to_proto(SamplingParams())
    msg.structured_outputs.disable_any_whitespace = True  # options, no constraint
    with pytest.raises(ValueError, match="structured_outputs: set exactly one of"):
        params_from_proto(msg)
    msg.structured_outputs.json = "{not json"
    with pytest.raises(ValueError, match=r"structured_outputs\.json is not valid JSON"):
        params_from_proto(msg)
    msg.structured_outputs.choice.SetInParent()  # an empty list of choices
    with pytest.raises(ValueError, match=r"structured_outputs\.choice must not be empty"):
        params_from_proto(msg)


def test_bad_values_in_a_message_name_the_field():
    msg = params_to_proto(SamplingParams())
    msg.top_p = 1.5
    with pytest.raises(ValueError, match="top_p"):
        params_from_proto(msg)
