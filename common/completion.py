"""One completion's output as it grows: token ids, text, logprobs and finish state.

The engine's output processor and the router feed a `CompletionTracker` the same way: the token
chunks that the producer (the engine core, or a worker over gRPC) sends, each with the finish
reason that came with its last token. The tracker applies them as the offline engine does:

- tokens are detokenized one at a time (`IncrementalDetokenizer`);
- the last token of a chunk that finished with "stop" on a token (eos or a stop token id) is
  kept among the token ids but its text is hidden (unless `include_stop_str_in_output`);
- a stop string ends the completion at the token that completed it: later tokens of the chunk
  are dropped and `add` returns True, since the producer is still generating and must be told
  to stop (the engine stops the request in its core, the router aborts it on the worker);
- once finished, further tokens are ignored.

`take_delta` gives what is new since its previous call, holding back text that may begin a stop
string while the completion runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.detokenizer import IncrementalDetokenizer
from common.logprobs import SampleLogprobs, TokenLogprobDict
from common.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@dataclass(slots=True)
class CompletionDelta:
    """What one completion produced since its previous delta.

    `logprobs` (when asked for) has one dict per token of `token_ids`: the sampled token and the
    top ones, with their text. `stop_reason` is the stop string or stop token id that ended the
    completion, if any; `finish_reason` ("stop", "length", "abort") is set once it has ended.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        """Whether the completion has ended (this delta carries its finish reason)."""
        return self.finish_reason is not None


class CompletionTracker:
    """Completion `index` of a request: `add` the producer's tokens, `take_delta` to stream.

    `token_ids` holds every kept output token (a final eos / stop token included), `text` the
    text so far (cut at a stop string), `logprobs` one dict per kept token when they are sent,
    `cumulative_logprob` the sum of the sampled tokens' logprobs.
    """

    def __init__(
        self,
        index: int,
        tokenizer: PreTrainedTokenizerFast,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
    ) -> None:
        self.index = index
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, params, prompt_token_ids)
        self.logprobs: SampleLogprobs | None = None
        self.cumulative_logprob: float | None = None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        # True when a stop string ended the completion while its producer was still generating.
        self.finished_here = False
        self._num_streamed_tokens = 0
        self._num_streamed_logprobs = 0
        self._finish_streamed = False

    @property
    def token_ids(self) -> list[int]:
        """The output token ids kept so far (the detokenizer's record of them)."""
        return self.detokenizer.token_ids

    @property
    def text(self) -> str:
        """All the text so far (a matched stop string cut off, unless it is to be included)."""
        return self.detokenizer.output_text

    @property
    def finished(self) -> bool:
        """Whether the completion has its finish reason."""
        return self.finish_reason is not None

    def add(
        self,
        token_ids: Sequence[int],
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
        stopped_by_token: bool = False,
        logprobs: Sequence[TokenLogprobDict] | None = None,
    ) -> bool:
        """Apply one chunk of new tokens from the producer.

        `finish_reason`, `stop_reason` (a stop token id) and `stopped_by_token` (the last token is
        eos / a stop token) come with the chunk's last token; `logprobs` has one dict per token.
        A chunk without tokens changes nothing. Returns True when a stop string ended the
        completion in this chunk while the producer had not (it must then be stopped).
        """
        if self.finish_reason is not None or not token_ids:
            return False
        last = len(token_ids) - 1
        if last == 0:  # the usual chunk: one token a step
            self._add_token(0, token_ids, finish_reason, stop_reason, stopped_by_token, logprobs)
        else:
            for i in range(last + 1):
                is_last = i == last
                self._add_token(
                    i,
                    token_ids[i : i + 1],
                    finish_reason if is_last else None,
                    stop_reason if is_last else None,
                    stopped_by_token and is_last,
                    logprobs,
                )
                if self.finish_reason is not None:
                    break
        return self.finished_here

    def _add_token(
        self,
        i: int,
        token: Sequence[int],
        finish_reason: str | None,
        stop_reason: int | str | None,
        stopped_by_token: bool,
        logprobs: Sequence[TokenLogprobDict] | None,
    ) -> None:
        """Token i of a chunk (`token` = [its id]): text, logprobs, then the finish reason."""
        stop = self.detokenizer.update(token, stopped_by_token)
        if logprobs is not None and i < len(logprobs):
            self._add_logprobs(token[0], logprobs[i])
        if finish_reason is not None:
            self.finish_reason = finish_reason
            self.stop_reason = stop if stop is not None else stop_reason
        elif stop is not None:
            self.finish_reason, self.stop_reason = "stop", stop
            self.finished_here = True

    def _add_logprobs(self, token_id: int, entry: TokenLogprobDict) -> None:
        if self.logprobs is None:
            self.logprobs = []
        self.logprobs.append(entry)
        sampled = entry.get(token_id)
        if sampled is not None:
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + sampled.logprob

    def take_delta(self) -> CompletionDelta | None:
        """The text, tokens and logprobs new since the previous call, and the finish reason once
        the completion has ended; None when there is nothing new to say. While unfinished, the
        last (longest stop string - 1) characters are held back."""
        finished = self.finish_reason is not None
        text = self.detokenizer.get_next_output_text(finished, delta=True)
        token_ids = self.token_ids
        new_tokens = token_ids[self._num_streamed_tokens :]
        announce = finished and not self._finish_streamed
        if not (text or new_tokens or announce):
            return None
        self._num_streamed_tokens = len(token_ids)
        self._finish_streamed = finished
        logprobs = None
        if self.logprobs is not None and len(self.logprobs) > self._num_streamed_logprobs:
            logprobs = self.logprobs[self._num_streamed_logprobs :]
            self._num_streamed_logprobs = len(self.logprobs)
        return CompletionDelta(
            self.index, text, new_tokens, logprobs, self.finish_reason, self.stop_reason
        )
