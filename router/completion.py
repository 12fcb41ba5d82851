"""Worker token chunks into completion deltas, through `common`'s tracker.

The text, stop strings and logprobs of each completion come from `common.completion`'s
`CompletionTracker`, the code the offline engine's output processor runs. This module only
translates: a worker's `TokenChunk` into the tracker's inputs (the workers apply no stop strings,
so "stop" from them always means an eos / stop token), and the tracker's delta into one that also
carries the worker's logprob messages (the gRPC front forwards those as they are).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common import completion
from common.fan_out import FanOut
from common.logprobs import TokenLogprobDict, to_logprob_dict
from proto.baton.v1 import common_pb2


@dataclass(slots=True)
class CompletionDelta(completion.CompletionDelta):
    """`common.completion.CompletionDelta` plus `raw_logprobs`: the worker's messages for the
    tokens of `logprobs`."""

    raw_logprobs: list[common_pb2.TokenLogprobs] | None = None


def apply_chunk(
    fan_out: FanOut, child_id: str, chunk: common_pb2.TokenChunk, decode: Callable[[int], str]
) -> CompletionDelta | None:
    """Feed one worker chunk to completion `child_id`; the delta to stream, or None when there
    is nothing new. After a stop string the completion is finished while the worker still runs
    it (`finished_here`): the caller stops reading, which aborts it there."""
    tracker = fan_out.completions[child_id]
    num = tracker.params.logprobs if tracker.params.logprobs is not None else 0
    logprobs = [_logprob_dict(e, num, decode) for e in chunk.logprobs] if chunk.logprobs else None
    fan_out.add(
        child_id,
        chunk.token_ids,
        chunk.finish_reason or None,
        chunk.stop_token_id if chunk.HasField("stop_token_id") else None,
        stopped_by_token=chunk.finish_reason == "stop",
        logprobs=logprobs,
    )
    delta = tracker.take_delta()
    if delta is None:
        return None
    raw = list(chunk.logprobs[: len(delta.token_ids)]) if delta.logprobs else None
    return CompletionDelta(
        delta.index,
        delta.text,
        delta.token_ids,
        delta.logprobs,
        delta.finish_reason,
        delta.stop_reason,
        raw_logprobs=raw,
    )


def _logprob_dict(
    entry: common_pb2.TokenLogprobs, num: int, decode: Callable[[int], str]
) -> TokenLogprobDict:
    """A worker's logprobs of one token as {token_id: Logprob}, with `num` top entries."""
    return to_logprob_dict(
        [entry.token_id, *entry.top_token_ids],
        [entry.logprob, *entry.top_logprobs],
        entry.rank,
        num,
        decode,
    )
