"""One completion's text, tokens, logprobs and finish state, built from worker token chunks.

Uses the engine's `IncrementalDetokenizer` and applies it exactly as the offline engine's
`OutputProcessor` does: tokens are fed one at a time (the engine makes one per step), the last
token of a chunk that finished with "stop" is an eos / stop token whose text is hidden, and a
stop string ends the completion at the token that completed it (later tokens are dropped, and
the caller aborts the request on the worker).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast

from common.detokenizer import IncrementalDetokenizer
from common.logprobs import Logprob, to_logprob_dict
from common.sampling_params import SamplingParams
from proto.baton.v1 import common_pb2

TokenLogprobDict = dict[int, Logprob]


@dataclass(slots=True)
class CompletionDelta:
    """What one completion produced since its previous delta.

    `logprobs` (one dict per token of `token_ids`, when asked for) holds the sampled token and
    the top ones, with decoded text; `raw_logprobs` are the worker's messages for the same.
    `stop_reason` is the stop string or stop token id that ended it, if any.
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobDict] | None = None
    raw_logprobs: list[common_pb2.TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionTracker:
    """Turns one worker request's token chunks into text deltas (`add`), as the engine would.

    `finished_here` is True when the router ended the completion (a stop string) while the
    worker is still generating: the caller must stop reading and abort it there.
    """

    def __init__(
        self,
        index: int,
        tokenizer: PreTrainedTokenizerFast,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        decode_token: Callable[[int], str],
    ) -> None:
        self.index = index
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, params, prompt_token_ids)
        self.decode_token = decode_token
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.finished_here = False
        self.num_cached_tokens: int | None = None  # from the first chunk (prefill side)

    @property
    def finished(self) -> bool:
        """Whether the completion has its finish reason."""
        return self.finish_reason is not None

    def add(self, chunk: common_pb2.TokenChunk) -> CompletionDelta | None:
        """Apply one chunk; the delta to stream, or None when there is nothing new to say."""
        if self.num_cached_tokens is None:
            self.num_cached_tokens = chunk.num_cached_tokens
        start = len(self.token_ids)
        last = len(chunk.token_ids) - 1
        for i, token_id in enumerate(chunk.token_ids):
            if self.finished:
                break
            worker_finish = chunk.finish_reason if i == last else ""
            self._add_token(token_id, worker_finish, chunk)
        new_tokens = self.token_ids[start:]
        text = self.detokenizer.get_next_output_text(self.finished, delta=True)
        if not (text or new_tokens or self.finished):
            return None
        raw = list(chunk.logprobs[: len(new_tokens)]) if chunk.logprobs else None
        return CompletionDelta(
            index=self.index,
            text=text,
            token_ids=new_tokens,
            logprobs=[self._logprob_dict(r) for r in raw] if raw else None,
            raw_logprobs=raw,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def _add_token(self, token_id: int, worker_finish: str, chunk: common_pb2.TokenChunk) -> None:
        """One token: text, then stop strings; the engine's order of finish reasons."""
        self.token_ids.append(token_id)
        # The workers apply no stop strings, so "stop" from them always means eos / stop token.
        stop = self.detokenizer.update([token_id], stop_terminated=worker_finish == "stop")
        if worker_finish:
            self.finish_reason = worker_finish
            token_stop = chunk.stop_token_id if chunk.HasField("stop_token_id") else None
            self.stop_reason = stop if stop is not None else token_stop
        elif stop is not None:
            self.finish_reason, self.stop_reason = "stop", stop
            self.finished_here = True

    def _logprob_dict(self, entry: common_pb2.TokenLogprobs) -> TokenLogprobDict:
        num = self.params.logprobs if self.params.logprobs is not None else 0
        return to_logprob_dict(
            [entry.token_id, *entry.top_token_ids],
            [entry.logprob, *entry.top_logprobs],
            entry.rank,
            num,
            self.decode_token,
        )

    @property
    def text(self) -> str:
        """All the text so far (a stop string cut off)."""
        return self.detokenizer.output_text
