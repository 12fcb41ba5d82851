"""Turns the core's token ids into text and vLLM-shaped outputs, one request at a time.

A request with `n > 1` is fanned out into `n` child requests in the core (ids `"{i}_{id}"`, as
vLLM names them); this processor gathers the children back into one `RequestOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.detokenizer import IncrementalDetokenizer
from common.logprobs import to_logprob_dict
from engine.outputs import (
    CompletionOutput,
    EngineCoreOutput,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
    StreamOutput,
)
from engine.request import Request
from engine.sampling.logprobs import LogprobsTensors


@dataclass(eq=False)
class CompletionState:
    """One child's text, tokens and logprobs so far."""

    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_streamed_tokens: int = 0
    finish_streamed: bool = False

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.output_text,
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass(eq=False)
class RequestState:
    """A user request: its prompt and its `n` completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    completions: dict[str, CompletionState]  # by child request id
    prompt_logprobs: PromptLogprobs | None = None
    # completions without a finish reason yet (`OutputProcessor._finish` counts them down):
    # `finished` is asked twice per request per step
    unfinished: int = field(init=False)

    def __post_init__(self) -> None:
        self.unfinished = sum(c.finish_reason is None for c in self.completions.values())

    @property
    def finished(self) -> bool:
        return self.unfinished == 0

    def to_output(self) -> RequestOutput:
        children = sorted(self.completions.values(), key=lambda c: c.index)
        first = children[0].request
        times = first.times
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[c.to_output() for c in children],
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
            num_cached_tokens=first.num_cached_tokens,
        )


class OutputProcessor:
    """Applies core outputs to request states; reports stop-string hits back to the caller."""

    def __init__(self, tokenizer) -> None:  # a transformers PreTrainedTokenizerFast
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._parent_of: dict[str, str] = {}
        self._token_text: dict[int, str] = {}

    def add(self, state: RequestState) -> None:
        self.requests[state.request_id] = state
        for child_id in state.completions:
            self._parent_of[child_id] = state.request_id

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
            completion = state.completions[out.request_id]
            if self._apply(state, completion, out):
                stopped.append(out.request_id)
        for state in touched.values():
            if state.finished:
                self.remove(state.request_id)
        return list(touched.values()), stopped

    def _apply(
        self, state: RequestState, completion: CompletionState, out: EngineCoreOutput
    ) -> bool:
        """Add new tokens; True if a stop string finished the completion here."""
        if not out.new_token_ids:
            return False
        completion.token_ids.extend(out.new_token_ids)
        if out.new_logprobs is not None:
            self._add_sample_logprobs(completion, out.new_logprobs)
        stop = completion.detokenizer.update(out.new_token_ids, out.stopped_by_token)
        if stop is not None and out.finish_reason is None:
            self._finish(state, completion, "stop", stop)
            return True
        if out.finish_reason is not None:
            self._finish(state, completion, out.finish_reason,
                         stop if stop is not None else out.stop_reason)  # fmt: skip
        return False

    @staticmethod
    def _finish(
        state: RequestState, completion: CompletionState, reason: str, stop: int | str | None
    ) -> None:
        if completion.finish_reason is None:
            state.unfinished -= 1
        completion.finish_reason, completion.stop_reason = reason, stop

    def _decode_one(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _add_sample_logprobs(self, completion: CompletionState, rows: LogprobsTensors) -> None:
        num = completion.request.params.logprobs or 0
        completion.logprobs = completion.logprobs if completion.logprobs is not None else []
        for i in range(rows.token_ids.shape[0]):
            entry = to_logprob_dict(
                rows.token_ids[i], rows.logprobs[i], int(rows.ranks[i]), num, self._decode_one
            )
            completion.logprobs.append(entry)
            completion.cumulative_logprob = (completion.cumulative_logprob or 0.0) + float(
                rows.logprobs[i, 0]
            )

    def _add_prompt_logprobs(self, state: RequestState, rows: LogprobsTensors) -> None:
        params = next(iter(state.completions.values())).request.params
        num = params.prompt_logprobs or 0
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no logprob
        for i in range(rows.token_ids.shape[0]):
            state.prompt_logprobs.append(
                to_logprob_dict(
                    rows.token_ids[i], rows.logprobs[i], int(rows.ranks[i]), num, self._decode_one
                )
            )

    @staticmethod
    def stream_deltas(state: RequestState) -> list[StreamOutput]:
        """The text and tokens of each completion not yet streamed (holding back stop strings)."""
        deltas = []
        for child in sorted(state.completions.values(), key=lambda c: c.index):
            finished = child.finish_reason is not None
            text = child.detokenizer.get_next_output_text(finished, delta=True)
            new_tokens = child.token_ids[child.num_streamed_tokens :]
            child.num_streamed_tokens = len(child.token_ids)
            announce = finished and not child.finish_streamed
            child.finish_streamed = finished
            if text or new_tokens or announce:
                deltas.append(
                    StreamOutput(
                        request_id=state.request_id,
                        index=child.index,
                        delta_text=text,
                        delta_token_ids=new_tokens,
                        finished=finished,
                        finish_reason=child.finish_reason,
                    )
                )
        return deltas
