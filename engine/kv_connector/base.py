"""The KV connector: how KV (and tensors that travel with it) enters or leaves an engine.

After vLLM v1's `KVConnectorBase_V1`, smaller and fitted to Baton's push model: the prefill
engine pushes a prompt's KV into blocks the decode engine reserved for it. A connector has two
sides, both called on the engine thread::

    Scheduler                           KVConnectorScheduler
      add_request ----------------->      get_num_new_matched_tokens, hands_off
        (blocks allocated at once) -->    update_state_after_alloc
      schedule() ------------------->     build_connector_meta (-> SchedulerOutput)
      a request finishes ----------->     request_finished (True: free its blocks later)

    EngineCore / ModelRunner            KVConnectorWorker
      once ------------------------->     register_kv_caches
      a step with metadata --------->     start_load_kv
        before layer i (per_layer) ->     wait_for_layer_load(i)
        after layer i (per_layer) -->     save_kv_layer(i, cache)
        after the forward pass ----->     wait_for_save      (step_failed if it raised)
      each step, and when idle ----->     get_finished  -> requests whose KV arrived, saves done

Units: tokens are token positions of a request (prompt first); blocks are KV cache block ids of
this engine; layers are indices into the model's decoder layers. A connector that moves data
between processes does it off the engine thread (the service's event loop, a transport's
thread); what comes back to the engine comes through `get_finished`, polled by the engine.

Extra tensors: a connector may carry named tensors with a request's KV (the last hidden state,
for a speculative decoder on the other side). The save side takes them by `save_extras`; the load
side hands them over by `get_extras` once the request's KV has arrived.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from engine.request import Request

if TYPE_CHECKING:
    from engine.scheduler.output import SchedulerOutput

NO_EXTRAS: Mapping[str, torch.Tensor] = {}


class KVConnectorMetadata:
    """What the worker side does in one step, decided by the scheduler side (a connector's own
    subclass; the engine only passes it on)."""

    @property
    def per_layer(self) -> bool:
        """True when the step needs `wait_for_layer_load` / `save_kv_layer` around every layer.
        Such a step runs the eager forward pass (no CUDA graph)."""
        return False


class LoadedRequest(NamedTuple):
    """A request whose KV arrived: it decodes on after `output_token_ids`, the tokens another
    engine sampled for it (the prefill engine's first token)."""

    request_id: str
    output_token_ids: tuple[int, ...]


class FinishedTransfers(NamedTuple):
    """What `KVConnectorWorker.get_finished` reports since its previous call."""

    saved: tuple[str, ...] = ()  # requests whose blocks `request_finished` kept: free them now
    loaded: tuple[LoadedRequest, ...] = ()  # requests waiting for KV: it is in their blocks

    def __bool__(self) -> bool:
        return bool(self.saved or self.loaded)


class KVConnectorScheduler(ABC):
    """The scheduler's side: which requests' KV comes from elsewhere or goes elsewhere."""

    @abstractmethod
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        """How many of `request`'s prompt tokens get their KV from elsewhere (0: none; this
        engine computes the prompt, after its prefix-cache hits).

        Asked once, when the request is added, with `num_computed_tokens` the prompt tokens this
        engine's prefix cache holds for it (whole blocks). A positive `n` counts from the end of
        the prompt: the last `n` tokens' KV arrives, the first `num_prompt_tokens - n` come from
        the prefix cache. So `n` is at least `num_prompt_tokens - num_computed_tokens` (the KV
        that arrives completes the prompt; more: blocks the cache holds are filled again, fresh)
        and `num_prompt_tokens - n` is a multiple of the block size.

        The scheduler then allocates every block of the prompt at once (EngineOverloadedError
        when they are not free), calls `update_state_after_alloc`, and keeps the request waiting
        (WAITING_FOR_KV) until `KVConnectorWorker.get_finished` reports it loaded.
        """

    @abstractmethod
    def update_state_after_alloc(
        self, request: Request, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        """Blocks are allocated for `request`, which waits for its KV: `block_ids` are all of
        its prompt's blocks in order; the last `ceil(num_external_tokens / block_size)` of them
        are to be filled from elsewhere. Called right after `get_num_new_matched_tokens`
        returned `num_external_tokens > 0`."""

    @abstractmethod
    def build_connector_meta(self, scheduled: SchedulerOutput) -> KVConnectorMetadata | None:
        """What the worker side loads or saves in the step `scheduled` (None: nothing, and the
        step may be launched asynchronously). Called once the step is decided; called again if
        requests leave it before it runs. Must not change `scheduled`."""

    def hands_off(self, request: Request) -> bool:
        """True when `request` ends here after its first sampled token, unless that token
        finishes it: another engine decodes it on (the prefill role). Its status is then
        HANDED_OFF and its output says `handed_off`. Asked once, when it is added."""
        return False

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> bool:
        """`request` finished here (stopped, aborted, handed off; `request.status` says which),
        holding `block_ids`. Called exactly once, before its blocks are freed; also for a request
        still waiting for its KV. True: the connector still reads the blocks (an asynchronous
        save), so they are freed only once `get_finished` reports the request `saved`."""
        return False


class KVConnectorWorker(ABC):
    """The model runner's side: the KV caches, and what a step loads into or saves from them.
    The step hooks do nothing by default: a connector overrides those it needs."""

    @abstractmethod
    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        """The engine's KV caches, one tensor per layer, each (2, num_blocks, block_size,
        num_kv_heads, head_dim) (0: keys, 1: values). Called once, when the connector is
        installed, before any step."""

    def start_load_kv(self, metadata: KVConnectorMetadata) -> None:
        """Before the forward pass of a step whose metadata is `metadata`: start what it loads
        and prepare what it saves (a save that sends while the step runs starts here)."""
        return None  # by default, nothing

    def wait_for_layer_load(self, layer: int) -> None:
        """Per-layer steps: return once `layer`'s KV that this step loads is in the cache;
        called before `layer` runs."""
        return None  # by default, nothing

    def save_kv_layer(self, layer: int, kv_cache: torch.Tensor) -> None:
        """Per-layer steps: `layer` has run and `kv_cache` (its cache tensor) holds this step's
        KV for it; save what the step saves of it (copy it out, or start sending it)."""
        return None  # by default, nothing

    def wait_for_save(self) -> None:
        """After the step's forward pass, before its requests' blocks can be freed or reused:
        finish (or take a copy for) every save of the step."""
        return None  # by default, nothing

    def step_failed(self) -> None:
        """The step's forward pass (or what followed it) raised: fail its saves and loads so
        that nothing waits for them."""
        return None  # by default, nothing

    def takes_extras(self, request_id: str) -> bool:
        """Whether `save_extras` for `request_id` would be taken now (False by default)."""
        return False

    def save_extras(self, request_id: str, extras: Mapping[str, torch.Tensor]) -> None:
        """Named tensors to carry with `request_id`'s KV (e.g. "hidden_states": the last prompt
        position's hidden state, (hidden_size,)). Given after the request is added and before
        its save is taken; a connector says which moment is too late. ValueError if this
        connector carries no extra tensors, or once it is too late."""
        raise ValueError(f"the {type(self).__name__} KV connector carries no extra tensors")

    def get_extras(self, request_id: str) -> Mapping[str, torch.Tensor]:
        """The named tensors that arrived with `request_id`'s KV (empty if none), from the
        moment `get_finished` reports it loaded until the request finishes here."""
        return NO_EXTRAS

    def get_finished(self) -> FinishedTransfers:
        """Transfers that finished since the previous call: saves `request_finished` delayed a
        free for, and loads. Polled by the engine at each step and while it is idle."""
        return FinishedTransfers()


class KVConnector:
    """A connector: its scheduler side and its worker side, installed together in one engine
    (`EngineCore(config, kv_connector)`). Made by name by `engine.kv_connector.registry`."""

    name: str = ""

    def __init__(self, scheduler: KVConnectorScheduler, worker: KVConnectorWorker) -> None:
        self.scheduler = scheduler
        self.worker = worker
