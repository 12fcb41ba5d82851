"""common.validation: the prompt and token-id checks and max_tokens resolution that the engine
(offline API, workers) and the router share."""

from __future__ import annotations

from dataclasses import replace

import pytest

from common.sampling_params import SamplingParams
from common.validation import (
    InvalidPromptError,
    check_prompt,
    resolve_max_tokens,
    validate_request,
)

VOCAB, CONTEXT = 100, 32


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([], "messages must not be empty"),
        ([1, 100, 2], r"messages: token ids must be in \[0, 100\) \(the vocabulary\), got 100"),
        ([-1], r"got -1"),
        ([1] * CONTEXT, r"maximum context length \(max_model_len\) is 32 tokens.*prompt is 32"),
    ],
)
def test_bad_prompts_name_their_field(prompt: list[int], message: str) -> None:
    with pytest.raises(InvalidPromptError, match=message) as error:
        check_prompt(prompt, VOCAB, CONTEXT, "messages")
    assert error.value.param == "messages"
    assert isinstance(error.value, ValueError)  # the engine's callers catch ValueError


def test_the_longest_prompt_leaves_one_token() -> None:
    prompt = [99] * (CONTEXT - 1)
    check_prompt(prompt, VOCAB, CONTEXT)
    assert validate_request(prompt, SamplingParams(max_tokens=None), VOCAB, CONTEXT) == 1


@pytest.mark.parametrize(("max_tokens", "expected"), [(None, 22), (5, 5), (22, 22), (500, 22)])
def test_max_tokens_resolve_against_the_room_left(max_tokens: int | None, expected: int) -> None:
    params = SamplingParams(max_tokens=max_tokens)
    assert resolve_max_tokens(params, 10, CONTEXT) == expected
    assert validate_request(list(range(10)), params, VOCAB, CONTEXT) == expected
    assert params.max_tokens == max_tokens  # the params are left as given


@pytest.mark.parametrize("field", ["logit_bias", "allowed_token_ids", "stop_token_ids"])
def test_token_ids_of_the_params_must_be_in_the_vocabulary(field: str) -> None:
    value = {VOCAB: 1.0} if field == "logit_bias" else [VOCAB]
    params = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field) as error:
        validate_request([1, 2], params, VOCAB, CONTEXT)
    assert not isinstance(error.value, InvalidPromptError)  # a parameter's error, not the prompt's


def test_min_tokens_past_the_room_left_is_for_the_caller_to_judge() -> None:
    """The resolved max_tokens is returned, not written back: the engine runs such a request up
    to the context (as vLLM's LLM does); the router writes it into the params, which refuse it
    (as vLLM's server does)."""
    params = SamplingParams(max_tokens=None, min_tokens=30)
    max_tokens = validate_request(list(range(10)), params, VOCAB, CONTEXT)
    assert max_tokens == 22
    with pytest.raises(ValueError, match="min_tokens must be <= max_tokens=22"):
        replace(params, max_tokens=max_tokens)
