"""Sampled tokens and logprobs of a step's logits rows, by request id."""

from __future__ import annotations

import functools

import torch

from engine.cuda_graphs import argmax_rows
from engine.runner.handle import LaunchedStep, ModelRunnerOutput
from engine.sampling.logprobs import LogprobsTensors, gather_logprobs
from engine.sampling.metadata import SamplingMetadata, SamplingRow
from engine.sampling.sampler import Sampler
from engine.scheduler.output import ScheduledRequest
from engine.spec_decode.verify import verify
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

    def launched(self, step: LaunchedStep, logits: torch.Tensor) -> LaunchedStep:
        """`step` (launched ahead, greedy) made to finish with its grammars' masks where a
        sampler has one (`LaunchedStep.finish`, later), else finished now."""
        if any(it.request.grammar is not None for it in step.samplers):
            step.grammars = functools.partial(
                argmax_under_grammars, logits, step.tokens, step.samplers, step.rows,
                self.vocab_size,
            )  # fmt: skip
        else:
            step.finish()
        return step

    def sample(
        self,
        logits: torch.Tensor,  # (N, vocab), float32 or (from a decode graph) the model's dtype
        items: list[ScheduledRequest],
        out: ModelRunnerOutput,
        greedy: torch.Tensor | None = None,  # (N,) argmax of `logits`, if already computed
    ) -> None:
        """Write each item's token (and logprobs row, where asked) into `out`. An item that
        verifies drafts has 1 + len(drafts) consecutive rows (engine.spec_decode.verify)."""
        if any(s.draft_token_ids for s in items):
            self._verify(logits, items, out)
            return
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


    def _verify(
        self, logits: torch.Tensor, items: list[ScheduledRequest], out: ModelRunnerOutput
    ) -> None:
        """Items with drafts verify them (1 + k rows each); the others sample as usual."""
        spec_rows: list[int] = []
        plain_rows: list[int] = []
        at = 0
        for item in items:
            n = 1 + len(item.draft_token_ids)
            (spec_rows if item.draft_token_ids else plain_rows).extend(range(at, at + n))
            at += n
        if plain_rows:
            plain = [item for item in items if not item.draft_token_ids]
            self.sample(logits[torch.tensor(plain_rows, device=logits.device)], plain, out)
        speculating = [item for item in items if item.draft_token_ids]
        picked = logits[torch.tensor(spec_rows, device=logits.device)]
        picked = _apply_draft_grammars(picked, speculating, self.vocab_size)
        verified = verify(picked, speculating, self.vocab_size)
        at = 0
        for item, accepted, token in zip(
            speculating, verified.accepted, verified.tokens, strict=True
        ):
            request_id = item.request.request_id
            out.sampled[request_id] = token
            out.accepted[request_id] = accepted
            num_top = item.request.params.logprobs
            if num_top is not None:  # a row per token: the accepted drafts', then its own
                tokens = torch.tensor([*accepted, token], device=picked.device)
                raw = torch.log_softmax(picked[at : at + len(tokens)].float(), dim=-1)
                out.logprobs[request_id] = gather_logprobs(raw, tokens, num_top)
            at += 1 + len(item.draft_token_ids)


def _apply_grammars(
    logits: torch.Tensor, items: list[ScheduledRequest], vocab_size: int
) -> torch.Tensor:
    """`logits` (N, V) with the grammars' disallowed tokens at -inf (a float32 copy), or
    `logits` itself when no item has a grammar."""
    structured = [i for i, s in enumerate(items) if s.request.grammar is not None]
    if not structured:
        return logits
    bitmask = allocate_bitmask(len(items), vocab_size, pin=logits.is_cuda)  # (N, cdiv(V, 32))
    for i in structured:
        _fill(items[i], bitmask, i)
    logits = logits.to(torch.float32, copy=True)
    apply_token_bitmask(logits, bitmask, structured)
    return logits


def _apply_draft_grammars(
    logits: torch.Tensor, items: list[ScheduledRequest], vocab_size: int
) -> torch.Tensor:
    """A verify step's rows (1 + len(drafts) per item) with each grammar's mask after the
    request's tokens and the drafts before the row (a float32 copy), or `logits` itself."""
    if all(item.request.grammar is None for item in items):
        return logits
    bitmask = allocate_bitmask(logits.shape[0], vocab_size, pin=logits.is_cuda)
    rows: list[int] = []
    at = 0
    for item in items:
        request, drafts = item.request, item.draft_token_ids
        if request.grammar is not None:
            request.grammar.fill_bitmask_rows(
                request.output_token_ids, drafts, request.eos_token_ids, bitmask, at
            )
            rows.extend(range(at, at + 1 + len(drafts)))
        at += 1 + len(drafts)
    logits = logits.to(torch.float32, copy=True)
    apply_token_bitmask(logits, bitmask, rows)
    return logits


def argmax_under_grammars(
    logits: torch.Tensor,  # (R, V) a launched step's logits
    tokens: torch.Tensor,  # (R,) their argmax ids, on the same device
    samplers: list[ScheduledRequest],
    rows: list[int],  # samplers[j]'s row of `logits` and `tokens`
    vocab_size: int,
) -> None:
    """Rewrite in `tokens` the id of each sampler with a grammar as the argmax of its logits
    row under the grammar's mask, filled now from the request's output tokens (a greedy step
    launched ahead: `LaunchedStep.finish`). A request finished meanwhile keeps its (unused)
    id."""
    masked = [j for j, s in enumerate(samplers) if _masks(s)]
    if not masked:
        return
    bitmask = allocate_bitmask(len(masked), vocab_size, pin=logits.is_cuda)
    for k, j in enumerate(masked):
        _fill(samplers[j], bitmask, k)
    at = torch.tensor([rows[j] for j in masked], dtype=torch.long, pin_memory=logits.is_cuda)
    at = at.to(logits.device, non_blocking=True)
    picked = logits.index_select(0, at)  # (M, V): a copy, the step's logits stay as they were
    apply_token_bitmask(picked, bitmask)
    tokens.index_copy_(0, at, argmax_rows(picked).to(tokens.dtype))


def keep_hidden(
    hidden: torch.Tensor, items: list[ScheduledRequest], out: ModelRunnerOutput
) -> None:
    """Record in `out.hidden` the final hidden state behind each item's last token: `hidden`
    (R, H) holds the sampled rows in item order (1 + len(drafts) per verifying item), and an
    item that accepted a drafts took its token from row a of its own."""
    at = 0
    for item in items:
        request_id = item.request.request_id
        out.hidden[request_id] = hidden[at + len(out.accepted.get(request_id, ()))]
        at += 1 + len(item.draft_token_ids)


def _masks(item: ScheduledRequest) -> bool:
    return item.request.grammar is not None and not item.request.is_finished


def _fill(item: ScheduledRequest, bitmask: torch.Tensor, row: int) -> None:
    request = item.request
    assert request.grammar is not None
    request.grammar.fill_bitmask(request.output_token_ids, request.eos_token_ids, bitmask, row)


def _row(t: LogprobsTensors, i: int) -> LogprobsTensors:
    return LogprobsTensors(
        token_ids=t.token_ids[i : i + 1], logprobs=t.logprobs[i : i + 1], ranks=t.ranks[i : i + 1]
    )
