"""Turns a `SchedulerOutput` into tensors, runs the forward pass, and samples.

The model runner knows nothing of queues or policies: it reads the scheduled requests (tokens,
positions, block ids), builds one ragged batch, computes logits only for the rows that need them
(the last token of each request that samples, and prompt positions whose logprobs were asked
for), and samples. `run` is its one entry point: it returns a `StepHandle` whose `result()`
gives the step's tokens, whether the step ran to completion or was launched ahead. How the
forward pass runs is chosen per step (engine.runner.forward): a CUDA graph replay where the
step fits one, else eagerly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from engine.attention import AttentionMetadata
from engine.config import (
    SPEC_METHODS_READING_HIDDEN,
    SPEC_METHODS_READING_STATES,
    EngineConfig,
    ModelConfig,
)
from engine.cuda_graphs import DecodeGraphs, default_capture_sizes
from engine.layers import Kernels
from engine.models.loader import load_model
from engine.runner.forward import CpuForward, EagerForward, GraphForward
from engine.runner.handle import CompletedStep, LaunchedStep, ModelRunnerOutput, StepHandle
from engine.runner.sample import StepSampler
from engine.scheduler.output import ScheduledRequest, SchedulerOutput

__all__ = ["LaunchedStep", "ModelRunner", "ModelRunnerOutput", "StepHandle"]


def kv_cache_block_bytes(model: ModelConfig, block_size: int) -> int:
    """Bytes one block of `block_size` tokens takes across all layers (K and V)."""
    elem = torch.tensor([], dtype=model.dtype).element_size()
    return 2 * model.num_layers * block_size * model.num_kv_heads * model.head_dim * elem


class ModelRunner:
    """Owns the model weights and the KV cache tensors of one engine."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)  # Triton launches on the current device
        self.block_size = config.cache.block_size
        # Triton or torch, and which fusions, for every layer: chosen once, here.
        self.kernels = Kernels.choose(config.kernels, self.device, config.model.dtype)
        self.kernels.configure_launches()
        self.model = load_model(config.model, self.device, self.kernels)
        self.num_blocks = self._num_blocks()
        m = config.model
        shape = (2, self.num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=m.dtype, device=self.device) for _ in range(m.num_layers)
        ]
        sampling = StepSampler(m.vocab_size, self.device)
        eager = EagerForward if self.device.type == "cuda" else CpuForward
        self.eager = eager(self.model, self.kv_caches, sampling, self.block_size)
        spec = config.speculative
        # A drafter that reads the model's states gets each request's last hidden state.
        self.keep_hidden = spec is not None and spec.method in SPEC_METHODS_READING_HIDDEN
        self.eager.keep_hidden = self.keep_hidden
        self.graph_hidden: torch.Tensor | None = None  # each replay's, when kept
        self.graph_states: torch.Tensor | None = None  # each replay's EAGLE states, when kept
        self.state_layers: tuple[int, ...] | None = None  # `keep_states`' layers
        # The largest graph: a row per sequence, k + 1 per sequence verifying k drafts.
        drafts = 0 if spec is None else spec.num_speculative_tokens
        self.graph_rows = config.scheduler.max_num_seqs * (1 + drafts)
        self.graphs: DecodeGraphs | None = None
        self.graph: GraphForward | None = None
        self._graphs_allowed = self.kernels.triton and not config.enforce_eager
        # EAGLE reads every row's states, of layers its drafter names: captured in keep_states
        reads_states = spec is not None and spec.method in SPEC_METHODS_READING_STATES
        if self._graphs_allowed and not reads_states:
            self._capture_graphs()

    def _capture_graphs(self) -> None:
        """Capture the decode graphs, with static buffers for what a drafter reads."""
        m = self.config.model
        size = max(default_capture_sizes(self.graph_rows))
        if self.keep_hidden:
            self.graph_hidden = torch.empty(size, m.hidden_size, dtype=m.dtype, device=self.device)
        if self.state_layers is not None:
            width = m.hidden_size * max(1, len(self.state_layers))
            self.graph_states = torch.empty(size, width, dtype=m.dtype, device=self.device)
        self.graphs = DecodeGraphs(
            self._decode_forward,
            self.device,
            default_capture_sizes(self.graph_rows),
            max_blocks=-(-m.max_model_len // self.block_size),
            block_size=self.block_size,
        )
        self.graphs.capture()
        sampling = self.eager.sampling
        self.graph = GraphForward(self.graphs, sampling, self.graph_hidden, self.graph_states)

    def keep_states(self, layers: tuple[int, ...]) -> None:
        """Record each step's states of the rows whose next token is known, for EAGLE
        (`ModelRunnerOutput.states`): `()` the final hidden state, else the residual stream
        entering each of `layers`, concatenated. Steps run to completion only. On a GPU the
        decode graphs are captured now, keeping the states in a static buffer."""
        self.eager.state_layers = self.state_layers = layers
        if self._graphs_allowed and self.graphs is None:
            self._capture_graphs()

    @property
    def graph_prompt_steps(self) -> int:
        """Steps whose prompt chunks ran in a decode graph."""
        return 0 if self.graph is None else self.graph.prompt_steps

    def _decode_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # (B, vocab) in the model's dtype: what a decode graph captures
        layers = self.state_layers
        if layers:  # EAGLE-3: the residual stream entering these layers, concatenated
            hidden, aux = self.model.forward_with_aux(
                input_ids, positions, self.kv_caches, meta, layers
            )
        else:
            hidden, aux = self.model(input_ids, positions, self.kv_caches, meta), []
        if self.graph_states is not None:  # captured with the graph: EAGLE reads them
            states = torch.cat(aux, dim=-1) if layers else hidden
            self.graph_states[: hidden.shape[0]].copy_(states)
        if self.graph_hidden is not None:  # captured with the graph: a drafter reads them
            self.graph_hidden[: hidden.shape[0]].copy_(hidden)
        # No float32 copy of the logits in the graph: the argmax is the same on either, and
        # the sampler (the only other reader) casts its own copy.
        return self.model.compute_logits(hidden, float32=False)

    def _num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        budget = cache.kv_cache_memory_bytes or self._default_kv_budget()
        block_bytes = kv_cache_block_bytes(self.config.model, self.block_size)
        if budget < block_bytes:
            raise ValueError(
                f"the KV cache budget ({budget} bytes) is smaller than one KV block "
                f"({block_bytes} bytes): raise kv_cache_memory_bytes or gpu_memory_utilization"
            )
        return int(budget // block_bytes)

    def _default_kv_budget(self) -> int:
        """1 GiB on CPU. On a GPU, as vLLM: this engine may use `gpu_memory_utilization` of the
        card (other processes, e.g. a second worker, have their own share); its weights already
        count against it, and the cache never takes more than is free now (less 256 MiB)."""
        if self.device.type != "cuda":
            return 1 << 30
        free, total = torch.cuda.mem_get_info(self.device)
        share = int(total * self.config.cache.gpu_memory_utilization)
        own = torch.cuda.memory_reserved(self.device)
        return min(share - own, free - (256 << 20))

    @torch.inference_mode()
    def run(
        self,
        scheduled: SchedulerOutput,
        *,
        ahead: bool = False,
        previous: LaunchedStep | None = None,
        layer_hook: Callable[[int], None] | None = None,
    ) -> StepHandle:
        """Start one step; its handle's `result()` gives the sampled tokens.

        `ahead` (asynchronous scheduling; every request `Request.launchable`): queue the step
        and return without waiting for the device, a `LaunchedStep`. `previous`, with `ahead`:
        the launched step whose tokens are not read yet; the items that sampled there take
        their input token from it on the device. Otherwise the step runs to completion, a
        `CompletedStep`; `layer_hook(i)`, if given, runs right after layer i's forward pass
        (the KV connector's per-layer saves and loads, engine.kv_connector), eagerly."""
        assert ahead or previous is None, "only a launched step chains on a previous one"
        assert not (ahead and layer_hook is not None), "a step with a layer hook runs to completion"
        cuda = self.device.type == "cuda"
        # the engine may step on another thread: launch on this runner's device
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            if ahead:
                return self._launch(scheduled.scheduled, previous)
            return CompletedStep(self._complete(scheduled.scheduled, layer_hook))

    def _complete(
        self, items: list[ScheduledRequest], layer_hook: Callable[[int], None] | None
    ) -> ModelRunnerOutput:
        hooked = layer_hook is not None  # the hook runs between layers: never in a graph
        rows = None if self.graph is None or hooked else self.graph.rows(items)
        if rows is None:
            return self.eager.complete(items, layer_hook)
        assert self.graph is not None
        return self.graph.complete(items, rows)

    def _launch(self, items: list[ScheduledRequest], previous: LaunchedStep | None) -> LaunchedStep:
        picks = None if previous is None else previous.picks_for(items)  # (S,) rows or None
        rows = None if self.graph is None else self.graph.rows(items, picks)
        if rows is None:
            return self.eager.launch(items, previous, picks)
        assert self.graph is not None
        return self.graph.launch(items, rows, previous)
