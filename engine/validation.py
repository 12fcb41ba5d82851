"""Checks of a request against the model, shared by the offline API and the worker services."""

from __future__ import annotations

from collections.abc import Sequence

from engine.config import ModelConfig
from engine.sampling_params import SamplingParams


def validate_prompt(token_ids: Sequence[int], params: SamplingParams, model: ModelConfig) -> int:
    """Raise ValueError (naming the field) for a prompt the model cannot take; return the
    resolved max_tokens (None means up to the context; never past it)."""
    if not token_ids:
        raise ValueError("prompt must not be empty")
    if min(token_ids) < 0 or max(token_ids) >= model.vocab_size:  # builtins: fast when fine
        bad = next(t for t in token_ids if not 0 <= t < model.vocab_size)
        raise ValueError(
            f"prompt_token_ids must be in [0, {model.vocab_size}) (the vocabulary), got {bad}"
        )
    if len(token_ids) >= model.max_model_len:
        raise ValueError(
            f"prompt is {len(token_ids)} tokens, but the model's context (max_model_len) is "
            f"{model.max_model_len}: the prompt must be shorter than max_model_len"
        )
    params.verify_token_ids(model.vocab_size)
    room = model.max_model_len - len(token_ids)
    return room if params.max_tokens is None else min(params.max_tokens, room)
