"""Conversions between the engine's Python types and the `baton.v1` messages."""

from __future__ import annotations

import json
from typing import Any

from common.sampling_params import SamplingParams
from common.structured_outputs import StructuredOutputsParams
from proto.baton.v1 import common_pb2

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_OPTIONAL_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "max_tokens",
    "repetition_penalty",
    "logprobs",
    "skip_special_tokens",
    "n",
    "spaces_between_special_tokens",
)
_PLAIN_FIELDS = (
    "min_tokens",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "include_stop_str_in_output",
)


_INT32_FIELDS = ("top_k", "max_tokens", "min_tokens", "logprobs", "n")
_TOKEN_ID_FIELDS = ("stop_token_ids", "allowed_token_ids", "logit_bias")


def check_wire_ranges(params: SamplingParams) -> None:
    """Raise ValueError (naming the field) for a value that `common.proto`'s SamplingParams
    cannot carry: int32 counts and token ids, an int64 seed. Completion i of n samples with
    seed + i, so all n seeds must fit. (Doubles need no check: SamplingParams refuses
    non-finite ones.)"""
    for name in _INT32_FIELDS:
        _check_int(name, getattr(params, name), INT32_MIN, INT32_MAX)
    for name in _TOKEN_ID_FIELDS:
        for token_id in getattr(params, name) or ():
            _check_int(name, token_id, INT32_MIN, INT32_MAX)
    if params.seed is not None:
        why = f" (with n={params.n}, seeds seed..seed+{params.n - 1})" if params.n > 1 else ""
        _check_int("seed", params.seed, INT64_MIN, INT64_MAX - (params.n - 1), why)


def _check_int(name: str, value: int | None, low: int, high: int, why: str = "") -> None:
    if value is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}]{why}, got {value}")


def params_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """Every field the engine uses, so the worker rebuilds the same SamplingParams."""
    msg = common_pb2.SamplingParams(
        stop=list(params.stop or []),
        stop_token_ids=list(params.stop_token_ids or []),
        logit_bias={int(k): float(v) for k, v in (params.logit_bias or {}).items()},
        allowed_token_ids=list(params.allowed_token_ids or []),
    )
    for name in _OPTIONAL_FIELDS + _PLAIN_FIELDS:
        value = getattr(params, name)
        if value is not None:
            setattr(msg, name, value)
    if params.structured_outputs is not None:
        msg.structured_outputs.CopyFrom(structured_to_proto(params.structured_outputs))
    return msg


def params_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """SamplingParams from a message; unset optional fields keep vLLM's defaults.

    Raises ValueError (naming the field) for out-of-range values, like SamplingParams itself.
    """
    kwargs: dict[str, Any] = {name: getattr(msg, name) for name in _PLAIN_FIELDS}
    for name in _OPTIONAL_FIELDS:
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    if msg.stop:
        kwargs["stop"] = list(msg.stop)
    if msg.stop_token_ids:
        kwargs["stop_token_ids"] = list(msg.stop_token_ids)
    if msg.logit_bias:
        kwargs["logit_bias"] = dict(msg.logit_bias)
    if msg.allowed_token_ids:
        kwargs["allowed_token_ids"] = list(msg.allowed_token_ids)
    if msg.HasField("structured_outputs"):
        kwargs["structured_outputs"] = structured_from_proto(msg.structured_outputs)
    return SamplingParams(**kwargs)


_JSON_CONSTRAINTS = ("json", "structural_tag")


def structured_to_proto(params: StructuredOutputsParams) -> common_pb2.StructuredOutputs:
    """The constraint and its options; a dict schema or tag travels as JSON text."""
    msg = common_pb2.StructuredOutputs(
        disable_any_whitespace=params.disable_any_whitespace,
        disable_additional_properties=params.disable_additional_properties,
        whitespace_pattern=params.whitespace_pattern,
        reasoning_end=list(params.reasoning_end or ()),
    )
    kind = params.kind
    value = getattr(params, kind)
    if kind == "choice":
        msg.choice.values.extend(value)
    elif kind in _JSON_CONSTRAINTS:
        msg.as_text = isinstance(value, str)
        setattr(msg, kind, value if msg.as_text else json.dumps(value))
    else:
        setattr(msg, kind, value)
    return msg


def structured_from_proto(msg: common_pb2.StructuredOutputs) -> StructuredOutputsParams:
    """StructuredOutputsParams from a message; ValueError (naming the field) when it is
    invalid or sets no constraint."""
    kind = msg.WhichOneof("constraint")
    kwargs: dict[str, Any] = {
        "disable_any_whitespace": msg.disable_any_whitespace,
        "disable_additional_properties": msg.disable_additional_properties,
    }
    if msg.HasField("whitespace_pattern"):
        kwargs["whitespace_pattern"] = msg.whitespace_pattern
    if msg.reasoning_end:
        kwargs["reasoning_end"] = tuple(msg.reasoning_end)
    if kind == "choice":
        kwargs["choice"] = list(msg.choice.values)
    elif kind in _JSON_CONSTRAINTS and not msg.as_text:
        kwargs[kind] = _json_object(kind, getattr(msg, kind))
    elif kind is not None:
        kwargs[kind] = getattr(msg, kind)
    return StructuredOutputsParams(**kwargs)


def _json_object(kind: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"structured_outputs.{kind} is not valid JSON: {e}") from None
