"""Sampled tokens and logprobs of a step's logits rows, by request id."""

from __future__ import annotations

import torch

from engine.runner.handle import ModelRunnerOutput
from engine.sampling.logprobs import LogprobsTensors
from engine.sampling.metadata import SamplingMetadata, SamplingRow
from engine.sampling.sampler import Sampler
from engine.scheduler.output import ScheduledRequest
from engine.structured.bitmask import allocate_bitmask, apply_token_bitmask


class StepSampler:
    """Samples one token per logits row of a step, row i for `items[i]`.

    Structured outputs restrict the rows of requests with a grammar by an allowed-token bitmask,
    (M, cdiv(V, 32)) int32 with bit t of row j set when token t may follow (engine.structured):
    applied to a copy of `logits` in `sample`, before the sampler, so the logprobs returned are
    those of the masked distribution. Such requests are never plain greedy. Speculative decoding
    (next) gives a request k + 1 consecutive rows (its verified positions), each its own
    `SamplingRow` (see engine.sampling.metadata)."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.sampler = Sampler()
        self.vocab_size = vocab_size
        self.device = device

    def sample(
        self,
        logits: torch.Tensor,  # (N, vocab), float32 or (from a decode graph) the model's dtype
        items: list[ScheduledRequest],
        out: ModelRunnerOutput,
        greedy: torch.Tensor | None = None,  # (N,) argmax of `logits`, if already computed
    ) -> None:
        """Write each item's token (and logprobs row, where asked) into `out`."""
        if all(s.request.plain_greedy for s in items):  # argmax is all there is to do
            if greedy is None:
                greedy = logits.argmax(dim=-1)
            for item, token in zip(items, greedy.tolist(), strict=True):
                out.sampled[item.request.request_id] = token
            return
        logits = _apply_grammars(logits, items, self.vocab_size)
        rows = [
            SamplingRow(
                params=s.request.params,
                prompt_token_ids=s.request.prompt_token_ids,
                output_token_ids=s.request.output_token_ids,
                generator=s.request.generator,
                eos_token_ids=s.request.eos_token_ids,
            )
            for s in items
        ]
        meta = SamplingMetadata.build(rows, self.vocab_size, self.device)
        result = self.sampler(logits, meta)
        tokens = result.sampled_token_ids.tolist()
        for i, item in enumerate(items):
            request_id = item.request.request_id
            out.sampled[request_id] = tokens[i]
            if result.logprobs is not None and item.request.params.logprobs is not None:
                out.logprobs[request_id] = _row(result.logprobs, i)


def _apply_grammars(
    logits: torch.Tensor, items: list[ScheduledRequest], vocab_size: int
) -> torch.Tensor:
    """`logits` (N, V) with the grammars' disallowed tokens at -inf (a float32 copy), or
    `logits` itself when no item has a grammar."""
    structured = [i for i, s in enumerate(items) if s.request.grammar is not None]
    if not structured:
        return logits
    bitmask = allocate_bitmask(len(structured), vocab_size)  # (M, cdiv(V, 32))
    for j, i in enumerate(structured):
        request = items[i].request
        assert request.grammar is not None
        request.grammar.fill_bitmask(request.output_token_ids, request.eos_token_ids, bitmask, j)
    logits = logits.to(torch.float32, copy=True)
    apply_token_bitmask(logits, bitmask, torch.tensor(structured, dtype=torch.long))
    return logits


def _row(t: LogprobsTensors, i: int) -> LogprobsTensors:
    return LogprobsTensors(
        token_ids=t.token_ids[i : i + 1], logprobs=t.logprobs[i : i + 1], ranks=t.ranks[i : i + 1]
    )
