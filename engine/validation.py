"""Checks of a request against the model, for the offline API and the worker services.

The checks themselves are `common.validation`'s (the router runs the same ones); this adapter
reads the limits from the engine's `ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.sampling_params import SamplingParams
from common.validation import validate_request
from engine.config import ModelConfig


def validate_prompt(token_ids: Sequence[int], params: SamplingParams, model: ModelConfig) -> int:
    """Raise ValueError (naming the field: the prompt is `prompt_token_ids`, as in the worker
    request) for a prompt the model cannot take; return the resolved max_tokens (None means up
    to the context; never past it)."""
    return validate_request(
        token_ids, params, model.vocab_size, model.max_model_len, "prompt_token_ids"
    )
