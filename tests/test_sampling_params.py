"""SamplingParams: defaults, normalisation, validation messages, token-id checks."""

from __future__ import annotations

from typing import Any

import pytest

from common.sampling_params import SamplingParams, SamplingType


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.detokenize and p.skip_special_tokens and p.spaces_between_special_tokens
    assert not p.ignore_eos and not p.include_stop_str_in_output
    assert p.logit_bias is None and p.allowed_token_ids is None and p.seed is None


def test_normalisation() -> None:
    p = SamplingParams(stop="###", stop_token_ids=None, seed=-1, max_tokens=None)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.seed is None
    assert p.max_tokens is None
    bias = SamplingParams(logit_bias={"5": 300.0, 7: -1.5}).logit_bias  # type: ignore[dict-item]
    assert bias == {5: 100.0, 7: -1.5}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"top_p": 0}, "top_p must be in (0, 1], got 0"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"n": 0}, "n must be an int >= 1"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"min_tokens": -1}, "min_tokens must be >= 0"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens must be <= max_tokens=4"),
        ({"top_k": -2}, "top_k must be"),
        ({"min_p": 1.5}, "min_p must be in [0, 1]"),
        ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
        ({"frequency_penalty": -3.0}, "frequency_penalty must be in [-2, 2]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"logprobs": -2}, "logprobs must be >= 0"),
        ({"prompt_logprobs": -5}, "prompt_logprobs must be >= 0"),
        ({"allowed_token_ids": []}, "allowed_token_ids must not be empty"),
        ({"stop": ["a", ""]}, "stop must contain only non-empty strings"),
        ({"stop": "x", "detokenize": False}, "stop strings need detokenize=True"),
        ({"temperature": 0.0, "n": 2}, "n must be 1 with greedy sampling"),
    ],
)
def test_validation_names_field(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    assert message in str(info.value)


def test_accepted_edge_values() -> None:
    SamplingParams(top_k=-1, logprobs=-1, prompt_logprobs=0, min_p=1.0, top_p=1.0)
    SamplingParams(min_tokens=4, max_tokens=4, presence_penalty=-2.0, frequency_penalty=2.0)


def test_sampling_type_and_greedy_ignores_truncation() -> None:
    greedy = SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2)
    assert greedy.sampling_type == SamplingType.GREEDY
    assert (greedy.top_k, greedy.top_p, greedy.min_p) == (0, 1.0, 0.0)
    assert SamplingParams(temperature=1e-6).sampling_type == SamplingType.GREEDY
    assert SamplingParams(temperature=0.7).sampling_type == SamplingType.RANDOM
    assert SamplingParams(seed=3).sampling_type == SamplingType.RANDOM_SEED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"logit_bias": {10: 1.0}}, "logit_bias"),
        ({"allowed_token_ids": [1, 50]}, "allowed_token_ids"),
        ({"stop_token_ids": [3, 99]}, "stop_token_ids"),
    ],
)
def test_verify_token_ids(kwargs: dict[str, Any], field: str) -> None:
    params = SamplingParams(**kwargs)
    params.verify_token_ids(100)
    with pytest.raises(ValueError, match=rf"^{field} must hold token ids in \[0, 10\)"):
        params.verify_token_ids(10)


def test_clone_is_deep() -> None:
    p = SamplingParams(stop=["a"], logit_bias={1: 2.0}, allowed_token_ids=[1, 2])
    q = p.clone()
    assert q == p
    assert q.stop is not p.stop and q.logit_bias is not p.logit_bias
    assert isinstance(q.stop, list)
    q.stop.append("b")
    assert p.stop == ["a"]
