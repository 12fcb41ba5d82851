"""The prefill role's connector ("push"): save a handed-off prompt's KV for a KV sender.

A request added with a `KVHandoff` (`Request.kv_transfer`) ends here after its first token,
unless that token finishes it: the decode engine whose reserved blocks the KV goes to decodes it
on. The step that computes the request's last prompt chunk saves the KV of the blocks the decode
side lacks (those after `KVHandoff.num_cached_tokens`) and announces the save, a `KVSave`, to
`on_save` (on the engine thread), whose owner sends it (prefill_service)::

    after the step (default): forward pass -> wait_for_save: copy the blocks, on_save -> sample
    layerwise:                start_load_kv: on_save -> layer 0 -> save_kv_layer(0) -> layer 1 ...

Layer-wise, the save is announced before the forward pass and filled layer by layer
(`engine.kv_connector.layerwise`), so its sending overlaps the prefill; the step then runs the
eager forward pass. Either way the save is announced before the first token is sampled, so also
for a request that token finishes (the output says whether it was handed off); and it is a copy,
so the blocks are freed as soon as the request finishes.

Extra tensors given by `save_extras` before the save is taken travel with it (layer-wise: before
the step starts; after the step: until the forward pass ends).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.config import EngineConfig
from engine.kv_connector.base import (
    KVConnector,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
)
from engine.kv_connector.layerwise import LayerwiseExport
from engine.request import Request

if TYPE_CHECKING:
    from engine.scheduler.output import SchedulerOutput


class CopiedLayers:
    """A `kv_transfer.KVLayerSource` over per-layer tensors already copied out of the cache."""

    def __init__(self, layers: list[torch.Tensor]) -> None:
        self._layers = layers

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer(self, i: int) -> torch.Tensor:
        """Layer i: (2, num_blocks, block_size, num_kv_heads, head_dim)."""
        return self._layers[i]


def copy_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> CopiedLayers:
    """A copy of `block_ids`' KV, one (2, n, block_size, Hkv, D) tensor per layer, queued on the
    current stream (valid as of it)."""
    device = kv_caches[0].device
    index = torch.tensor(list(block_ids), dtype=torch.long, device=device)
    return CopiedLayers([cache.index_select(1, index) for cache in kv_caches])


@dataclass(slots=True)
class KVSave:
    """One request's saved KV, for a `kv_transfer.KVSender`: `layers` holds the blocks after the
    decode side's cached ones, in prompt order, (2, n, block_size, Hkv, D) per layer; `extras`
    are the named tensors that travel after them."""

    request_id: str
    layers: CopiedLayers | LayerwiseExport
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SaveBlocks:
    """Save `block_ids` (this engine's, in prompt order) of `request_id` in this step."""

    request_id: str
    block_ids: tuple[int, ...]


@dataclass(slots=True)
class PushMetadata(KVConnectorMetadata):
    """The saves of one step; `layerwise`: taken layer by layer during the forward pass."""

    saves: list[SaveBlocks]
    layerwise: bool

    @property
    def per_layer(self) -> bool:
        return self.layerwise


@dataclass(slots=True)
class _Handoffs:
    """What both sides share: the requests that hand off, their extras until saved, and those
    saved already (too late for extras)."""

    requests: set[str] = field(default_factory=set)
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    saved: set[str] = field(default_factory=set)

    def forget(self, request_id: str) -> None:
        self.requests.discard(request_id)
        self.extras.pop(request_id, None)
        self.saved.discard(request_id)


class PushScheduler(KVConnectorScheduler):
    """Requests with a `KVHandoff` hand off after their first token; the step that computes the
    last chunk of one's prompt saves its blocks after the decode side's cached ones."""

    def __init__(
        self, block_size: int, layerwise: bool = False, handoffs: _Handoffs | None = None
    ) -> None:
        self.block_size = block_size
        self.layerwise = layerwise
        self._handoffs = handoffs or _Handoffs()  # shared with the worker side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        return 0  # the prefill engine computes every prompt itself

    def update_state_after_alloc(
        self, request: Request, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        """Never called: no KV arrives here."""

    def hands_off(self, request: Request) -> bool:
        """True for a request with a `KVHandoff` (remembered until it finishes)."""
        if request.kv_transfer is None:
            return False
        self._handoffs.requests.add(request.request_id)
        return True

    def build_connector_meta(self, scheduled: SchedulerOutput) -> PushMetadata | None:
        saves = []
        for item in scheduled.scheduled:
            request, handoff = item.request, item.request.kv_transfer
            if handoff is None or item.start + item.num_tokens != request.num_prompt_tokens:
                continue
            first = handoff.num_cached_tokens // self.block_size
            saves.append(SaveBlocks(request.request_id, tuple(item.block_ids[first:])))
        return PushMetadata(saves, self.layerwise) if saves else None

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> bool:
        self._handoffs.forget(request.request_id)
        return False  # the save is a copy: the blocks may go


class PushWorker(KVConnectorWorker):
    """Takes each step's saves out of the caches and announces them to `on_save`."""

    def __init__(
        self, layerwise: bool, on_save: Callable[[KVSave], None], handoffs: _Handoffs
    ) -> None:
        self.layerwise = layerwise
        self._on_save = on_save
        self._handoffs = handoffs
        self._kv_caches: list[torch.Tensor] = []
        self._step: list[SaveBlocks] = []  # saves of the running step
        self._exports: list[LayerwiseExport] = []  # ... layer-wise, being filled

    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self._kv_caches = list(kv_caches)

    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        assert isinstance(metadata, PushMetadata)
        self._step = metadata.saves
        if not self.layerwise:
            return
        for save in self._step:
            export = LayerwiseExport(self._kv_caches, save.block_ids)
            self._exports.append(export)
            self._announce(save.request_id, export)

    def save_kv_layer(self, layer: int, kv_cache: torch.Tensor) -> None:
        for export in self._exports:
            export.capture(layer, kv_cache)

    def wait_for_save(self) -> None:
        if not self.layerwise:
            for save in self._step:
                self._announce(save.request_id, copy_blocks(self._kv_caches, save.block_ids))
        self._step, self._exports = [], []

    def step_failed(self) -> None:
        for export in self._exports:
            export.cancel()
        self._step, self._exports = [], []

    def takes_extras(self, request_id: str) -> bool:
        handoffs = self._handoffs
        return request_id in handoffs.requests and request_id not in handoffs.saved

    def save_extras(self, request_id: str, extras: Mapping[str, torch.Tensor]) -> None:
        """Carry `extras` with the request's save; ValueError for a request without a KV handoff
        here, or once its save is taken (layer-wise: when its last prompt step starts)."""
        handoffs = self._handoffs
        if request_id not in handoffs.requests:
            raise ValueError(f"request {request_id!r} hands no KV off here")
        if request_id in handoffs.saved:
            raise ValueError(f"request {request_id!r}: its KV save is already taken")
        handoffs.extras.setdefault(request_id, {}).update(extras)

    def _announce(self, request_id: str, layers: CopiedLayers | LayerwiseExport) -> None:
        self._handoffs.saved.add(request_id)
        extras = self._handoffs.extras.pop(request_id, {})
        self._on_save(KVSave(request_id, layers, extras))


class PushConnector(KVConnector):
    """The prefill role's connector. `on_save(save)` is called on the engine thread, during the
    step that takes the save: it must not block (hand the save to another thread or loop)."""

    def __init__(
        self,
        engine_config: EngineConfig,
        *,
        on_save: Callable[[KVSave], None],
        layerwise: bool = False,
    ) -> None:
        handoffs = _Handoffs()
        super().__init__(
            PushScheduler(engine_config.cache.block_size, layerwise, handoffs),
            PushWorker(layerwise, on_save, handoffs),
        )
