"""A request's `n` completions: fanned out as child requests, gathered back in index order.

vLLM's scheme, shared by the offline engine and the router so that both produce the same
completions for the same seed::

    request "r", n = 3   ->   children "0_r", "1_r", "2_r"   (n = 1: the child is "r" itself)
                              each with n = 1 and, when seeded, seed + index

Each child is tracked by a `CompletionTracker`; `FanOut` holds them by child request id, counts
down the unfinished ones as their tokens arrive, and hands back deltas and outputs by index.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

from common.completion import CompletionDelta, CompletionTracker
from common.logprobs import TokenLogprobDict
from common.sampling_params import SamplingParams


def child_request_id(request_id: str, index: int, n: int) -> str:
    """The id of completion `index` of `n` as its own request: `request_id` itself when n = 1,
    else f"{index}_{request_id}"."""
    return request_id if n == 1 else f"{index}_{request_id}"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Completion `index`'s parameters: it samples once (n = 1); seeded ones get seed + index.
    With n = 1 the parameters themselves."""
    if params.n == 1:
        return params
    seed = None if params.seed is None else params.seed + index
    return replace(params, n=1, seed=seed)


TrackerFactory = Callable[[int, SamplingParams], CompletionTracker]


class FanOut:
    """One request's `n` completions by child request id, in index order.

    `make_tracker(index, child_params)` builds each completion's tracker (the caller knows the
    tokenizer and the prompt). `finished` is kept as a count, so asking it every step is cheap.
    """

    def __init__(
        self, request_id: str, params: SamplingParams, make_tracker: TrackerFactory
    ) -> None:
        self.request_id = request_id
        n = params.n
        self.completions: dict[str, CompletionTracker] = {
            child_request_id(request_id, i, n): make_tracker(i, child_params(params, i))
            for i in range(n)
        }
        self.unfinished = n

    @property
    def finished(self) -> bool:
        """Every completion has its finish reason."""
        return self.unfinished == 0

    @property
    def first(self) -> CompletionTracker:
        """Completion 0."""
        return next(iter(self.completions.values()))

    @property
    def num_output_tokens(self) -> int:
        """Output tokens of all completions so far."""
        return sum(len(c.token_ids) for c in self.completions.values())

    def add(
        self,
        child_id: str,
        token_ids: Sequence[int],
        finish_reason: str | None = None,
        stop_reason: int | str | None = None,
        stopped_by_token: bool = False,
        logprobs: Sequence[TokenLogprobDict] | None = None,
    ) -> bool:
        """`CompletionTracker.add` on child `child_id`: True when a stop string ended it while
        its producer was still generating (the caller stops that child request)."""
        tracker = self.completions[child_id]
        if tracker.finish_reason is not None:
            return False
        stopped_here = tracker.add(
            token_ids, finish_reason, stop_reason, stopped_by_token, logprobs
        )
        if tracker.finish_reason is not None:
            self.unfinished -= 1
        return stopped_here

    def take_deltas(self) -> list[CompletionDelta]:
        """Each completion's delta since the previous call, in index order (none if nothing)."""
        deltas = (c.take_delta() for c in self.completions.values())
        return [d for d in deltas if d is not None]
