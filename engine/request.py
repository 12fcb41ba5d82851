"""A request as the engine core tracks it: tokens, progress, status and timings."""

from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kv_cache.hashing import BlockHash
from engine.sampling_params import SamplingParams, SamplingType
from engine.structured.matcher_state import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    WAITING_FOR_GRAMMAR = enum.auto()  # structured outputs: its grammar is compiling
    WAITING_FOR_KV = enum.auto()  # decode role: blocks reserved, KV pushed by a prefill worker
    HANDED_OFF = enum.auto()  # prefill role: first token sampled, KV exported, decoding elsewhere

    @property
    def finished(self) -> bool:
        """Done in this engine (a handed-off request goes on in another one)."""
        return self in _FINISH_REASONS or self == RequestStatus.HANDED_OFF

    @property
    def finish_reason(self) -> str | None:
        """vLLM's finish_reason string: "stop", "length", "abort", or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(frozen=True, slots=True)
class KVHandoff:
    """Prefill role: the decode side's reservation that this request's KV goes to.

    The first `num_cached_tokens` prompt tokens (whole blocks) are already on the decode side
    and are not sent; `target` is the transport's address of the reserved blocks.
    """

    num_cached_tokens: int = 0
    target: Any = None


@dataclass(slots=True)
class RequestTimes:
    """Wall-clock timestamps (seconds, time.time()) of a request's milestones."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass(eq=False)
class Request:
    """One sequence to generate. `max_tokens` is resolved (never None) by whoever builds it.

    Progress is `num_computed_tokens` over `all_token_ids` (prompt + output): a step computes
    the tokens between them; when it reaches the end, a token is sampled and appended. A request
    preempted by recompute simply restarts at 0 with its output kept in `all_token_ids`.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.time)
    priority: int = 0  # lower runs first under the priority policy
    tenant: str = "default"  # fair-share policy unit
    cache_salt: str | None = None  # prefix-cache isolation: only equal salts share blocks
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    prompt_logprob_pos: int = 0  # next prompt position whose logprobs are still to compute
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    generator: torch.Generator | None = None
    block_hashes: list[BlockHash] = field(default_factory=list)  # of full blocks, in order
    # Prefill role: where this request's KV goes. Set, the request ends here after its first
    # token (unless that token finishes it) and its KV is exported before its blocks are freed.
    kv_transfer: KVHandoff | None = None
    # Structured outputs: the grammar's compile, then the matcher of its output tokens.
    grammar: RequestGrammar | None = None
    # Speculative decoding: the drafts proposed for its next step (engine.spec_decode).
    spec_token_ids: list[int] = field(default_factory=list)
    # ... and, for drafters that read the model's states (MLP speculator, EAGLE), the final
    # hidden state (H,) of the position whose logits gave its last token (on the device).
    spec_hidden: torch.Tensor | None = None
    # ... and, for EAGLE (engine.spec_decode.eagle), the states of computed positions not yet
    # fed to its head: (first position, (m, D) states of it and the m - 1 after), in order.
    # Only positions whose next token is known (verified) are here.
    spec_states: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    times: RequestTimes = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)
        self.times = RequestTimes(arrival=self.arrival_time)
        if self.generator is None and self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @functools.cached_property
    def plain_greedy(self) -> bool:
        """Sampling is a bare argmax: greedy, with nothing that edits the logits or asks for
        logprobs (asked every step, so computed once: the params never change)."""
        return self.greedy_argmax and self.params.structured_outputs is None

    @functools.cached_property
    def greedy_argmax(self) -> bool:
        """Its token is the argmax of its logits, masked by its grammar if it has structured
        outputs: greedy, with nothing else that edits the logits or asks for logprobs."""
        params = self.params
        return (
            params.sampling_type == SamplingType.GREEDY
            and params.logprobs is None
            and not params.allowed_token_ids
            and not params.logit_bias
            and params.min_tokens == 0
            and params.presence_penalty == 0
            and params.frequency_penalty == 0
            and params.repetition_penalty == 1
        )

    @functools.cached_property
    def launchable(self) -> bool:
        """Its steps may be launched before the previous step's tokens are read (asynchronous
        scheduling, `ModelRunner.run(..., ahead=True)`): a greedy argmax, so its token need not
        reach the host first (under a grammar, the step's mask is filled once the previous
        step's tokens are read, while the forward pass runs: `LaunchedStep.finish`); no prompt
        logprobs; not handed off (the prefill role reads its first token at once). Asked
        every step: computed once (neither changes)."""
        params = self.params
        return self.greedy_argmax and params.prompt_logprobs is None and self.kv_transfer is None

    @functools.cached_property
    def speculates(self) -> bool:
        """Drafts may be proposed for it (speculative decoding on): not while its prompt
        logprobs are owed. Under a grammar, only the drafts it allows are verified, each row
        masked; logprobs come one row per accepted token."""
        return self.params.prompt_logprobs is None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
