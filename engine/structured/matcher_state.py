"""One request's grammar: its compile future, then a matcher that follows its output tokens."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from engine.structured.backend import CompiledGrammar, GrammarCompileTimeoutError, GrammarMatcher
from engine.structured.reasoning_end import EndScan, ReasoningEnd

if TYPE_CHECKING:
    from engine.structured.compiler import CompileStats


class GrammarRefusedError(RuntimeError):
    """The matcher refused a token: the mask allowed nothing the sampler could take."""


class RequestGrammar:
    """The grammar state of one request.

    The matcher follows `output_token_ids` lazily: `sync` accepts the tokens it has not seen
    and, where the request has fewer tokens than it accepted (a dropped token), rolls back or
    resets and replays. So a recompute after preemption, or a request resumed elsewhere with
    tokens sampled by another engine, finds its matcher where its tokens say.

    With `timeout_s`, a compile not done that many seconds after this object was made (the
    request's submission) is given up: `error()` is a GrammarCompileTimeoutError naming
    `field`. `stats` (the compiler's) counts timeouts, and requests by the backend whose
    grammar they generate under.

    With `reasoning_end` (e.g. `</think>`), the grammar applies only after the output's text
    first holds the marker: before it every token is allowed and the matcher sees nothing; from
    the token after the one that completes it on, the matcher follows the tokens as above.
    """

    def __init__(
        self,
        future: Future[CompiledGrammar],
        field: str = "structured_outputs",
        timeout_s: float | None = None,
        stats: CompileStats | None = None,
        reasoning_end: ReasoningEnd | None = None,
    ) -> None:
        self.future = future
        self.reasoning_end = reasoning_end
        self._start: int | None = None if reasoning_end is not None else 0
        self._scan: EndScan | None = None  # how far the output was searched for the end
        self.field = field
        self.timeout_s = timeout_s
        self.stats = stats
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._timed_out = False
        self._matcher: GrammarMatcher | None = None
        self._num_accepted = 0

    @property
    def ready(self) -> bool:
        """The compile is over (done or failed), or took longer than `timeout_s`."""
        return self.future.done() or self._check_deadline()

    def _check_deadline(self) -> bool:
        deadline = self._deadline
        if not self._timed_out and deadline is not None and time.monotonic() >= deadline:
            self._timed_out = True
            if self.stats is not None:
                self.stats.timeouts += 1
        return self._timed_out

    def error(self) -> BaseException | None:
        """Why the request cannot have its grammar (the compile failed or timed out); None
        while compiling or once compiled."""
        if self._timed_out:
            assert self.timeout_s is not None
            return GrammarCompileTimeoutError(self.field, self.timeout_s)
        return self.future.exception() if self.future.done() else None

    @property
    def matcher(self) -> GrammarMatcher:
        if self._matcher is None:
            grammar = self.future.result()
            self._matcher = grammar.matcher()
            if self.stats is not None:  # the request generates under it from now on
                requests = self.stats.requests
                requests[grammar.backend] = requests.get(grammar.backend, 0) + 1
        return self._matcher

    def grammar_start(self, output_token_ids: Sequence[int]) -> int | None:
        """The index of the first output token the grammar constrains (just after the first
        `reasoning_end`), or None while the reasoning goes on. Scans only tokens it has not
        seen (a shorter list than last time is scanned again)."""
        start = self._start
        if start is not None and start <= len(output_token_ids):
            return start
        assert self.reasoning_end is not None
        since = self._scan
        if since is not None and since.scanned > len(output_token_ids):
            since = None
        self._scan = self.reasoning_end.scan(output_token_ids, since)
        self._start = self._scan.end
        return self._start

    def sync(self, output_token_ids: Sequence[int]) -> None:
        """Make the matcher have accepted exactly the constrained part of `output_token_ids`."""
        start = self.grammar_start(output_token_ids)
        self._sync(output_token_ids[start:] if start is not None else ())

    def _sync(self, output_token_ids: Sequence[int]) -> None:
        matcher, seen = self.matcher, self._num_accepted
        if len(output_token_ids) < seen:
            if not matcher.rollback(seen - len(output_token_ids)):
                matcher.reset()
                seen = 0
            else:
                seen = len(output_token_ids)
        for token in output_token_ids[seen:]:
            if not matcher.accept_token(token):
                raise GrammarRefusedError(f"the grammar refused token {token}")
            seen += 1
        self._num_accepted = seen

    def advance(self, output_token_ids: Sequence[int], token: int) -> bool:
        """Accept `token` after `output_token_ids`; False (the matcher left as it was, or in
        its error state for good) when the grammar refuses it."""
        self.sync(output_token_ids)  # nothing to do unless tokens were dropped or replaced
        if self.grammar_start(output_token_ids) is None:
            return True  # reasoning: free (this token may end it; the next sync sees so)
        if not self.matcher.accept_token(token):
            return False
        self._num_accepted += 1
        return True

    def valid_drafts(self, output_token_ids: Sequence[int], drafts: Sequence[int]) -> list[int]:
        """The longest prefix of `drafts` the grammar allows after `output_token_ids`
        (speculative decoding: a draft the grammar refuses is never verified)."""
        self.sync(output_token_ids)
        if self.grammar_start(output_token_ids) is None:
            return self._reasoning_drafts(output_token_ids, drafts)
        matcher = self.matcher
        n = 0
        while n < len(drafts) and not matcher.is_terminated() and matcher.accept_token(drafts[n]):
            n += 1
        self._undo(n)
        return list(drafts[:n])

    def _reasoning_drafts(
        self, output_token_ids: Sequence[int], drafts: Sequence[int]
    ) -> list[int]:
        """Drafts during the reasoning: all of them up to the one that ends it (those after
        would need the grammar's verdict; they are left out)."""
        assert self.reasoning_end is not None
        tokens = [*output_token_ids, *drafts]
        end = self.reasoning_end.scan(tokens, self._scan).end
        return list(drafts if end is None else drafts[: end - len(output_token_ids)])

    def fill_bitmask_rows(
        self,
        output_token_ids: Sequence[int],
        drafts: Sequence[int],
        eos_token_ids: Sequence[int],
        bitmask: torch.Tensor,  # (N, cdiv(V, 32)) int32, CPU
        first_row: int,
    ) -> None:
        """Rows `first_row` .. `first_row + len(drafts)`: the tokens allowed after
        `output_token_ids` and drafts[:j] (a verify step's rows; the drafts are valid)."""
        if self.grammar_start(output_token_ids) is None:  # drafts end at the reasoning's end
            tokens = list(output_token_ids)
            for j in range(len(drafts) + 1):
                self.fill_bitmask(tokens, eos_token_ids, bitmask, first_row + j)
                tokens.extend(drafts[j : j + 1])
            self.grammar_start(output_token_ids)  # forget an end found among the drafts
            return
        self.fill_bitmask(output_token_ids, eos_token_ids, bitmask, first_row)
        matcher = self.matcher
        for j, token in enumerate(drafts):
            if not matcher.accept_token(token):
                raise GrammarRefusedError(f"the grammar refused draft token {token}")
            if matcher.is_terminated():
                bitmask[first_row + j + 1] = 0
                _allow(bitmask, first_row + j + 1, eos_token_ids)
            else:
                matcher.fill_bitmask(bitmask, first_row + j + 1)
        self._undo(len(drafts))

    def _undo(self, num_tokens: int) -> None:
        """Take back the last `num_tokens` tokens accepted beyond the request's own."""
        if num_tokens and not self.matcher.rollback(num_tokens):
            self.matcher.reset()
            self._num_accepted = 0  # the next sync replays the request's tokens

    def fill_bitmask(
        self,
        output_token_ids: Sequence[int],
        eos_token_ids: Sequence[int],
        bitmask: torch.Tensor,  # (N, cdiv(V, 32)) int32, CPU
        row: int,
    ) -> None:
        """Sync to `output_token_ids`, then write the tokens allowed next into `bitmask[row]`.
        A terminated grammar (EOS accepted, `ignore_eos` going on) allows only EOS; during the
        reasoning every token is allowed."""
        if self.grammar_start(output_token_ids) is None:
            bitmask[row] = -1
            return
        self.sync(output_token_ids)
        if self.matcher.is_terminated():
            bitmask[row] = 0
            _allow(bitmask, row, eos_token_ids)
            return
        self.matcher.fill_bitmask(bitmask, row)


def _allow(bitmask: torch.Tensor, row: int, token_ids: Sequence[int]) -> None:
    for token in token_ids:
        word, bit = divmod(token, 32)
        bitmask[row, word] |= -(1 << 31) if bit == 31 else 1 << bit
