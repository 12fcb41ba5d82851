"""Turns the core's token ids into text and vLLM-shaped outputs, one request at a time.

A request with `n > 1` runs as `n` child requests in the core (`common.fan_out`: ids
`"{i}_{id}"`, as vLLM names them); this processor feeds each core output to its child's
`CompletionTracker` (text, stop strings, logprobs: the same code the router runs) and gathers
the children back into one `RequestOutput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.completion import CompletionTracker
from common.detokenizer import TokenTexts
from common.fan_out import FanOut
from common.logprobs import PromptLogprobs, TokenLogprobDict, to_logprob_dict
from engine.outputs import (
    CompletionOutput,
    EngineCoreOutput,
    RequestMetrics,
    RequestOutput,
    StreamOutput,
)
from engine.request import Request
from engine.sampling.logprobs import LogprobsTensors

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@dataclass(eq=False)
class RequestState:
    """A user request: its prompt, its `n` completions (`fan_out`) and completion 0's core
    request (whose timings and cached tokens the output reports)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    fan_out: FanOut
    first_request: Request
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def completions(self) -> dict[str, CompletionTracker]:
        """The completions by child request id, in index order."""
        return self.fan_out.completions

    @property
    def finished(self) -> bool:
        """Every completion has its finish reason (asked twice per request per step: cheap)."""
        return self.fan_out.unfinished == 0

    def to_output(self) -> RequestOutput:
        """The request as vLLM returns it (cumulative: everything so far)."""
        times = self.first_request.times
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[_completion_output(c) for c in self.completions.values()],
            finished=self.finished,
            metrics=RequestMetrics(
                arrival_time=times.arrival,
                last_token_time=times.last_token,
                first_scheduled_time=times.first_scheduled,
                first_token_time=times.first_token,
                time_in_queue=(times.first_scheduled - times.arrival)
                if times.first_scheduled
                else None,
                finished_time=times.finished,
            ),
            num_cached_tokens=self.first_request.num_cached_tokens,
        )


def _completion_output(tracker: CompletionTracker) -> CompletionOutput:
    return CompletionOutput(
        index=tracker.index,
        text=tracker.text,
        token_ids=list(tracker.token_ids),
        cumulative_logprob=tracker.cumulative_logprob,
        logprobs=tracker.logprobs,
        finish_reason=tracker.finish_reason,
        stop_reason=tracker.stop_reason,
    )


class OutputProcessor:
    """Applies core outputs to request states; reports stop-string hits back to the caller."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._parent_of: dict[str, str] = {}
        self._token_text = TokenTexts(tokenizer)

    def add(self, state: RequestState) -> None:
        """Start tracking a request (its child ids route core outputs to it)."""
        self.requests[state.request_id] = state
        for child_id in state.completions:
            self._parent_of[child_id] = state.request_id

    def parent_of(self, child_id: str) -> str | None:
        """The user request a completion (child) id belongs to; None if unknown."""
        return self._parent_of.get(child_id)

    def remove(self, request_id: str) -> list[str]:
        """Forget a request; returns its child ids (for aborting them in the core)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        for child_id in state.completions:
            self._parent_of.pop(child_id, None)
        return list(state.completions)

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestState], list[str]]:
        """Returns the touched request states and the child ids that a stop string finished."""
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        for out in outputs:
            parent_id = self._parent_of.get(out.request_id)
            if parent_id is None:
                continue
            state = self.requests[parent_id]
            touched[parent_id] = state
            if out.prompt_logprobs is not None:
                self._add_prompt_logprobs(state, out.prompt_logprobs)
            if self._apply(state, out):
                stopped.append(out.request_id)
        for state in touched.values():
            if state.finished:
                self.remove(state.request_id)
        return list(touched.values()), stopped

    def _apply(self, state: RequestState, out: EngineCoreOutput) -> bool:
        """Add new tokens; True if a stop string finished the completion here."""
        if not out.new_token_ids:
            return False
        logprobs = None
        if out.new_logprobs is not None:
            num = state.completions[out.request_id].params.logprobs or 0
            logprobs = _logprob_dicts(out.new_logprobs, num, self._token_text)
        return state.fan_out.add(
            out.request_id,
            out.new_token_ids,
            out.finish_reason,
            out.stop_reason,
            out.stopped_by_token,
            logprobs,
        )

    def _add_prompt_logprobs(self, state: RequestState, rows: LogprobsTensors) -> None:
        num = state.fan_out.first.params.prompt_logprobs or 0
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no logprob
        state.prompt_logprobs.extend(_logprob_dicts(rows, num, self._token_text))

    @staticmethod
    def stream_deltas(state: RequestState) -> list[StreamOutput]:
        """The text and tokens of each completion not yet streamed (holding back stop strings)."""
        return [
            StreamOutput(
                request_id=state.request_id,
                index=delta.index,
                delta_text=delta.text,
                delta_token_ids=delta.token_ids,
                finished=delta.finished,
                finish_reason=delta.finish_reason,
            )
            for delta in state.fan_out.take_deltas()
        ]


def _logprob_dicts(
    rows: LogprobsTensors, num: int, decode: Callable[[int], str]
) -> list[TokenLogprobDict]:
    """One {token_id: Logprob} per row: its sampled/target token and `num` top ones."""
    return [
        to_logprob_dict(rows.token_ids[i], rows.logprobs[i], int(rows.ranks[i]), num, decode)
        for i in range(rows.token_ids.shape[0])
    ]
