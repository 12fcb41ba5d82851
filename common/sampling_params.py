"""Per-request sampling parameters, with vLLM's fields, defaults and validation.

A `SamplingParams` is validated once, when built; a bad value raises `ValueError` whose message
names the field and its allowed range (the API layer turns it into HTTP 400).
"""

from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass

from common.structured_outputs import StructuredOutputsParams

# Temperatures below this sample greedily (argmax), as in vLLM.
SAMPLING_EPS = 1e-5
# OpenAI clamps each logit_bias value to this magnitude.
MAX_LOGIT_BIAS = 100.0


class SamplingType(enum.IntEnum):
    """How a request picks its next token."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request's output, with vLLM's meaning for every field.

    Token counts (`max_tokens`, `min_tokens`) are in tokens. `top_k` 0 or -1 disables it.
    `max_tokens=None` means up to the context limit (the engine resolves it). `logprobs` and
    `prompt_logprobs` are the number of top logprobs to return per position; -1 = whole vocab.
    After construction `stop` and `stop_token_ids` are always lists, `logit_bias` has int keys
    and values clamped to [-100, 100], and greedy requests have top_k/top_p/min_p disabled.

    `structured_outputs` constrains the output to a format (`StructuredOutputsParams`; a dict of
    its fields is accepted too). New kinds of constraint are added as further fields here,
    validated in their own `_validate_*` method called from `__post_init__`.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._validate_counts()
        self._validate_penalties()
        self._validate_sampling()
        self._validate_stops()
        self._validate_token_lists()
        self._validate_structured_outputs()
        if self.temperature < SAMPLING_EPS:
            self._make_greedy()

    def _normalise(self) -> None:
        if self.seed == -1:
            self.seed = None
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            # JSON gives string keys; clamp as the OpenAI API does (NaN has no meaning).
            if any(math.isnan(float(bias)) for bias in self.logit_bias.values()):
                raise ValueError("logit_bias values must be numbers, got NaN")
            self.logit_bias = {
                int(tok): min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, float(bias)))
                for tok, bias in self.logit_bias.items()
            }
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)

    def _validate_counts(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (or None), got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < -1:
                raise ValueError(f"{name} must be >= 0, or -1 for the whole vocab, got {value}")

    def _validate_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0.0):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    def _validate_sampling(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= 1, or 0 / -1 to disable, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    def _validate_stops(self) -> None:
        assert isinstance(self.stop, list) and isinstance(self.stop_token_ids, list)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must contain only non-empty strings, got {self.stop}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True")
        if not all(isinstance(t, int) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must contain only ints, got {self.stop_token_ids}")

    def _validate_token_lists(self) -> None:
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise ValueError("allowed_token_ids must not be empty (use None for no restriction)")

    def _validate_structured_outputs(self) -> None:
        so = self.structured_outputs
        if isinstance(so, dict):  # the JSON spelling (an API body)
            try:
                self.structured_outputs = StructuredOutputsParams(**so)
            except TypeError as e:
                raise ValueError(f"structured_outputs: {e}") from None
        elif so is not None and not isinstance(so, StructuredOutputsParams):
            raise ValueError(
                f"structured_outputs must be a StructuredOutputsParams, got {type(so).__name__}"
            )

    def _make_greedy(self) -> None:
        if self.n > 1:
            raise ValueError(f"n must be 1 with greedy sampling (temperature=0), got {self.n}")
        self.top_p = 1.0
        self.top_k = 0
        self.min_p = 0.0

    @property
    def sampling_type(self) -> SamplingType:
        """GREEDY below temperature 1e-5, RANDOM_SEED when a seed is set, else RANDOM."""
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    def verify_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError if logit_bias, allowed_token_ids or stop_token_ids name a token id
        outside [0, vocab_size)."""
        fields: dict[str, list[int]] = {
            "logit_bias": list(self.logit_bias or {}),
            "allowed_token_ids": self.allowed_token_ids or [],
            "stop_token_ids": list(self.stop_token_ids or []),
        }
        for name, ids in fields.items():
            bad = sorted({t for t in ids if not 0 <= t < vocab_size})
            if bad:
                raise ValueError(f"{name} must hold token ids in [0, {vocab_size}), got {bad[:10]}")

    def clone(self) -> SamplingParams:
        """A deep copy, safe to mutate (e.g. per-sequence seeds for n > 1)."""
        return copy.deepcopy(self)
