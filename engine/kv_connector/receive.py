"""The decode role's connector ("receive"): reserve blocks for a prompt whose KV is pushed here.

A decode worker answers the router's Reserve with blocks to fill; a prefill worker's KV sender
writes them, through this engine's KV receiver (kv_transfer), from the service's event loop
while the engine steps other requests (a `KVReceiver` owns its reserved blocks until its
transfer is done); the worker's Decode call then reports the KV in place, with the first token
the prefill engine sampled, and the request decodes on::

    reserve(core, request)   -> Reservation(block_ids, num_cached_tokens)     (engine thread)
    ... KV written into block_ids by the receiver ...                          (event loop)
    kv_arrived(rid, [first], extras) -> get_finished() -> the request decodes  (engine thread)

The service methods, `reserve` and `kv_arrived`, run on the engine thread (in an
`AsyncEngineCore` command). A reservation uses this engine's own prefix cache, unless asked for
fresh blocks (the prefill side then sends every block). Aborting the request (a lease that ran
out) frees its blocks; the service first makes sure its receiver writes them no more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig
from engine.kv_connector.base import (
    NO_EXTRAS,
    FinishedTransfers,
    KVConnector,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
    LoadedRequest,
)
from engine.request import Request

if TYPE_CHECKING:
    from engine.core import EngineCore
    from engine.scheduler.output import SchedulerOutput


@dataclass(frozen=True, slots=True)
class Reservation:
    """Blocks held for a request's KV: `block_ids` to fill, in prompt order, after the first
    `num_cached_tokens` prompt tokens (whole blocks) that this engine's prefix cache holds."""

    block_ids: tuple[int, ...]
    num_cached_tokens: int


@dataclass(slots=True)
class _Arrivals:
    """What both sides share: reservations by request id (None until the blocks are
    allocated), requests whose KV arrived, and their extra tensors."""

    reuse_prefix: dict[str, bool] = field(default_factory=dict)
    reserved: dict[str, Reservation] = field(default_factory=dict)
    arrived: list[LoadedRequest] = field(default_factory=list)
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def forget(self, request_id: str) -> None:
        self.reuse_prefix.pop(request_id, None)
        self.reserved.pop(request_id, None)
        self.extras.pop(request_id, None)
        # (one in `arrived` stays there: the scheduler skips arrivals of finished requests)


class ReceiveScheduler(KVConnectorScheduler):
    """A reserved request's whole prompt after its prefix-cache hits (or all of it, for fresh
    blocks) arrives from elsewhere."""

    def __init__(self, block_size: int, arrivals: _Arrivals) -> None:
        self.block_size = block_size
        self._arrivals = arrivals

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        reuse = self._arrivals.reuse_prefix.get(request.request_id)
        if reuse is None:
            return 0  # not reserved: a request this engine runs itself
        return request.num_prompt_tokens - (num_computed_tokens if reuse else 0)

    def update_state_after_alloc(
        self, request: Request, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        num_cached = request.num_prompt_tokens - num_external_tokens
        first = num_cached // self.block_size
        reservation = Reservation(tuple(block_ids[first:]), num_cached)
        self._arrivals.reserved[request.request_id] = reservation

    def build_connector_meta(self, scheduled: SchedulerOutput) -> KVConnectorMetadata | None:
        return None  # the KV arrives between steps, written by the receiver

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> bool:
        self._arrivals.forget(request.request_id)
        return False


class ReceiveWorker(KVConnectorWorker):
    """Holds the caches the receiver writes, and reports the requests whose KV arrived."""

    def __init__(self, arrivals: _Arrivals) -> None:
        self._arrivals = arrivals
        self.kv_caches: list[torch.Tensor] = []

    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self.kv_caches = list(kv_caches)

    def get_extras(self, request_id: str) -> Mapping[str, torch.Tensor]:
        return self._arrivals.extras.get(request_id, NO_EXTRAS)

    def get_finished(self) -> FinishedTransfers:
        arrivals = self._arrivals
        if not arrivals.arrived:
            return FinishedTransfers()
        loaded, arrivals.arrived = tuple(arrivals.arrived), []
        return FinishedTransfers(loaded=loaded)


class ReceiveConnector(KVConnector):
    """The decode role's connector; its service methods run on the engine thread."""

    def __init__(self, engine_config: EngineConfig) -> None:
        self._arrivals = _Arrivals()
        self.receive_worker = ReceiveWorker(self._arrivals)
        block_size = engine_config.cache.block_size
        super().__init__(ReceiveScheduler(block_size, self._arrivals), self.receive_worker)

    @property
    def kv_caches(self) -> list[torch.Tensor]:
        """The caches a KV receiver writes into (known once the connector is installed)."""
        return self.receive_worker.kv_caches

    def reserve(self, core: EngineCore, request: Request, reuse_prefix: bool = True) -> Reservation:
        """Add `request` to `core` to wait for its prompt's KV, holding blocks for it now.

        With `reuse_prefix`, blocks this engine's prefix cache holds for the prompt are kept
        and only the others are to be filled; else every block is fresh. Raises what
        `EngineCore.add_request` raises (EngineOverloadedError when the blocks are not free).
        """
        rid = request.request_id
        if rid in self._arrivals.reuse_prefix:
            raise ValueError(f"request_id {rid!r} already has a reservation")
        self._arrivals.reuse_prefix[rid] = reuse_prefix
        try:
            core.add_request(request)
        except BaseException:
            self._arrivals.forget(rid)
            raise
        return self._arrivals.reserved[rid]

    def kv_arrived(
        self,
        request_id: str,
        output_token_ids: Sequence[int],
        extras: Mapping[str, torch.Tensor] = NO_EXTRAS,
    ) -> None:
        """The reserved request's KV is in its blocks: it decodes on after `output_token_ids`
        (sampled by the prefill engine), with `extras` for `get_extras`. KeyError if the
        reservation is gone (expired or aborted) or its KV was reported already."""
        if self._arrivals.reserved.pop(request_id, None) is None:
            raise KeyError(f"no reservation {request_id!r} (expired or aborted)")
        self._arrivals.reuse_prefix.pop(request_id, None)
        if extras:
            self._arrivals.extras[request_id] = dict(extras)
        self._arrivals.arrived.append(LoadedRequest(request_id, tuple(output_token_ids)))
