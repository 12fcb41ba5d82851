"""The one contract between the scheduler and the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_connector.base import KVConnectorMetadata
from engine.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    """`num_tokens` tokens of `request`, starting at its `num_computed_tokens`, run this step.

    `block_ids` cover every token up to the end of this step's chunk. With speculative
    decoding the chunk's last `len(draft_token_ids)` tokens are drafts (not in the request's
    tokens), each of its rows sampled to verify them (engine.spec_decode).
    """

    request: Request
    num_tokens: int
    block_ids: list[int]
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def start(self) -> int:
        """Position of the first token computed this step."""
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the request's tokens, so a token is sampled
        (asked before the step counts as computed: `Scheduler.advance`)."""
        return self.start + self.num_tokens >= self.request.num_tokens

    @property
    def pending(self) -> bool:
        """True when this step's one token was sampled by the step before, on the device, and
        is not read yet (asynchronous scheduling: `Scheduler.schedule_next`)."""
        return self.start == self.request.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """What one engine step computes: requests in batch order, with their token counts, and
    what the KV connector's worker side loads or saves during it (None: nothing)."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    kv_connector_metadata: KVConnectorMetadata | None = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
