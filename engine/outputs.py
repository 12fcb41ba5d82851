"""What the engine hands back: per-step core outputs and vLLM-shaped request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.logprobs import PromptLogprobs, SampleLogprobs
from engine.sampling.logprobs import LogprobsTensors


@dataclass(slots=True)
class EngineCoreOutput:
    """One request's result of one engine step (token ids only; text is the caller's job).

    `prompt_logprobs` rows are the prompt positions computed this step (a prefill chunk), in
    order; row p scores prompt token p + 1. Rows carry as many top-k columns as the batch's
    largest request asked for: slice to the request's own count.
    `stopped_by_token` is True when the last token is an eos/stop token (its text is not shown).
    """

    request_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsTensors | None = None  # one row per new token
    prompt_logprobs: LogprobsTensors | None = None  # one row per prompt position this step
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    stopped_by_token: bool = False
    num_cached_tokens: int = 0
    handed_off: bool = False  # prefill role: decoding goes on in another engine
    error: str | None = None  # a request failed before running (its grammar did not compile)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def done_here(self) -> bool:
        """No more outputs for this request will come from this engine."""
        return self.finished or self.handed_off


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps in seconds (time.time()); `time_in_queue` is first_scheduled - arrival."""

    arrival_time: float
    last_token_time: float | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's `n` completions, as vLLM returns it."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # LLM.chat with tools or a reasoning parser: the answer read as OpenAI's message parts
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    content: str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    """A request's prompt and its completions so far (cumulative, like vLLM's default)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0


@dataclass(slots=True)
class StreamOutput:
    """What `LLM.stream` yields: the text and tokens new since the last chunk of one completion."""

    request_id: str
    index: int
    delta_text: str
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
