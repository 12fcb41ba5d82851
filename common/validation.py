"""Checks of a request against the served model, the same in the router and in the engine.

A prompt must be non-empty, inside the vocabulary and shorter than the context
(`max_model_len`, in tokens); the token ids the parameters name (logit_bias, allowed and stop
token ids) must be inside the vocabulary; `max_tokens` resolves against the room left in the
context (None = all of it, never past it).

The resolved value is returned, not written into the parameters: the offline engine keeps a
request's `SamplingParams` as given (so `min_tokens` may exceed what the context leaves, as in
vLLM's `LLM`), while the router copies it into the parameters it sends, where `SamplingParams`
refuses such a `min_tokens` (as vLLM's OpenAI server does).
"""

from __future__ import annotations

from collections.abc import Sequence

from common.sampling_params import SamplingParams


class InvalidPromptError(ValueError):
    """A prompt the model cannot take; `param` names the request field that carried it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_prompt(
    token_ids: Sequence[int], vocab_size: int, max_model_len: int, param: str = "prompt"
) -> None:
    """Raise InvalidPromptError for an empty prompt, a token id outside [0, vocab_size), or a
    prompt of max_model_len tokens or more (no room left to generate one token)."""
    if not token_ids:
        raise InvalidPromptError(f"{param} must not be empty", param)
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:  # builtins: fast when all is well
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise InvalidPromptError(
            f"{param}: token ids must be in [0, {vocab_size}) (the vocabulary), got {bad}", param
        )
    if len(token_ids) >= max_model_len:
        raise InvalidPromptError(
            f"This model's maximum context length (max_model_len) is {max_model_len} tokens. "
            f"However, your prompt is {len(token_ids)} tokens: the prompt must be shorter than "
            "the context.",
            param,
        )


def resolve_max_tokens(params: SamplingParams, num_prompt_tokens: int, max_model_len: int) -> int:
    """Output tokens a request may generate: `params.max_tokens` capped by the room left in the
    context, or all of that room when max_tokens is None."""
    room = max_model_len - num_prompt_tokens
    return room if params.max_tokens is None else min(params.max_tokens, room)


def validate_request(
    token_ids: Sequence[int],
    params: SamplingParams,
    vocab_size: int,
    max_model_len: int,
    param: str = "prompt",
) -> int:
    """Check the prompt (InvalidPromptError naming `param`) and the token ids of `params`
    (ValueError naming the field); return the resolved max_tokens."""
    check_prompt(token_ids, vocab_size, max_model_len, param)
    params.verify_token_ids(vocab_size)
    return resolve_max_tokens(params, len(token_ids), max_model_len)
