"""Conversions between the engine's Python types and the `baton.v1` messages."""

from __future__ import annotations

from typing import Any

from engine.sampling_params import SamplingParams
from proto.baton.v1 import common_pb2

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
    return SamplingParams(**kwargs)
