"""The service contracts: stubs current, messages round-trip the engine's types."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
    ],
)
def test_sampling_params_round_trip_exactly(params):
    assert params_from_proto(params_to_proto(params)) == params


def test_bad_values_in_a_message_name_the_field():
    msg = params_to_proto(SamplingParams())
    msg.top_p = 1.5
    with pytest.raises(ValueError, match="top_p"):
        params_from_proto(msg)
