"""Turns a `SchedulerOutput` into tensors, runs the forward pass, and samples.

The model runner knows nothing of queues or policies: it reads the scheduled requests (tokens,
positions, block ids), builds one ragged batch, computes logits only for the rows that need them
(the last token of each request that samples, and prompt positions whose logprobs were asked
for), and samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import (
    DecodeGraphs,
    argmax_rows,
    default_capture_sizes,
    fill_rows,
    graph_rows,
)
from engine.layers import Kernels
from engine.models.loader import load_model
from engine.sampling.logprobs import LogprobsTensors, compute_prompt_logprobs
from engine.sampling.metadata import SamplingMetadata, SamplingRow
from engine.sampling.sampler import Sampler
from engine.scheduler.output import ScheduledRequest, SchedulerOutput


@dataclass(slots=True)
class ModelRunnerOutput:
    """Per request id: the sampled token, its logprobs row, and prompt logprobs rows."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, LogprobsTensors] = field(default_factory=dict)
    prompt_logprobs: dict[str, LogprobsTensors] = field(default_factory=dict)


@dataclass(slots=True)
class LaunchedStep:
    """A plain-greedy step queued on the device whose sampled tokens are not read yet.

    `tokens` holds the step's argmax ids on the device: `samplers[j]` (the items that sample,
    in the step's order) has its token at row `rows[j]`, which the next step reads on the
    device if it chains on (`ModelRunner.launch`'s `picks`). `host_tokens` are the same ids in
    (pinned) host memory, readable once `ready` completes. `in_graph`: the step ran in a decode
    graph, so its ids are the graphs' `last_greedy`."""

    samplers: list[ScheduledRequest]
    rows: list[int]
    tokens: torch.Tensor
    host_tokens: torch.Tensor
    ready: torch.cuda.Event | None  # None on the CPU: the step ran synchronously
    in_graph: bool = False

    def row_of(self) -> dict[str, int]:
        """The row of `tokens` of each sampled request, by request id."""
        return {it.request.request_id: r for it, r in zip(self.samplers, self.rows, strict=True)}

    def picks_for(self, items: list[ScheduledRequest]) -> list[int | None]:
        """For each of a next step's items, the row of `tokens` that holds its input token
        (it sampled here), else None: `ModelRunner.launch`'s `picks`."""
        samplers = self.samplers
        if len(items) == len(samplers) and all(
            a.request is b.request for a, b in zip(items, samplers, strict=True)
        ):  # the same requests in the same order: a decode step after a decode step
            return list(self.rows)
        row_of = self.row_of()
        return [row_of.get(it.request.request_id) for it in items]


@dataclass(slots=True)
class _PromptLogprobsSlice:
    request_id: str
    rows: slice  # rows of the logits tensor
    targets: list[int]  # the prompt token each row scores
    num_top: int


@dataclass(slots=True)
class _BatchInputs:
    input_ids: torch.Tensor  # (T,)
    positions: torch.Tensor  # (T,)
    attn_meta: AttentionMetadata
    logits_indices: torch.Tensor  # (R,) rows of the hidden states to project to logits
    sample_rows: list[ScheduledRequest]  # the first len(sample_rows) logits rows, in order
    prompt_slices: list[_PromptLogprobsSlice]


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
        self.sampler = Sampler()
        self.num_blocks = self._num_blocks()
        m = config.model
        shape = (2, self.num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.kv_caches = [
            torch.zeros(shape, dtype=m.dtype, device=self.device) for _ in range(m.num_layers)
        ]
        self.graphs: DecodeGraphs | None = None
        self.graph_prompt_steps = 0  # steps whose prompt chunks ran in a decode graph
        if self.kernels.triton and not config.enforce_eager:
            self.graphs = DecodeGraphs(
                self._decode_forward,
                self.device,
                default_capture_sizes(config.scheduler.max_num_seqs),
                max_blocks=-(-m.max_model_len // self.block_size),
                block_size=self.block_size,
            )
            self.graphs.capture()

    def _decode_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:  # (B, vocab) in the model's dtype: what a decode graph captures
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
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
    def execute(
        self, scheduled: SchedulerOutput, layer_hook: Callable[[int], None] | None = None
    ) -> ModelRunnerOutput:
        """Run one step's forward pass and sample for the requests that reached their end.

        `layer_hook(i)`, if given, runs right after layer i's forward pass (the KV connector's
        per-layer saves and loads, engine.kv_connector); the step then runs eagerly."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):  # the engine may step on another thread
                return self._execute(scheduled, layer_hook)
        return self._execute(scheduled, layer_hook)

    def _execute(
        self, scheduled: SchedulerOutput, layer_hook: Callable[[int], None] | None
    ) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        if layer_hook is not None:  # the eager forward pass, with the hook after each layer
            self.model.model.layer_hook = layer_hook
            try:
                return self._execute_eager(scheduled, out)
            finally:
                self.model.model.layer_hook = None
        rows = None if self.graphs is None else graph_rows(scheduled.scheduled, self.graphs.sizes)
        if rows is None:
            return self._execute_eager(scheduled, out)
        assert self.graphs is not None
        ids, positions, tables, sample_rows = rows
        if len(ids) > len(scheduled.scheduled):
            self.graph_prompt_steps += 1
        logits, greedy = self.graphs.run(positions, tables, ids)
        items = [it for it in scheduled.scheduled if it.samples]
        if len(sample_rows) == len(ids):  # every row samples: a pure decode step
            self._sample(logits, items, out, greedy)
        elif all(it.request.plain_greedy for it in items):
            picked = greedy.tolist()  # (rows,): cheaper read whole than indexed on the device
            for item, row in zip(items, sample_rows, strict=True):
                out.sampled[item.request.request_id] = picked[row]
        elif items:
            self._sample(logits[torch.tensor(sample_rows, device=logits.device)], items, out)
        return out

    @torch.inference_mode()
    def launch(
        self,
        items: list[ScheduledRequest],
        previous: LaunchedStep | None = None,
        picks: list[int | None] | None = None,
    ) -> LaunchedStep:
        """Queue a step of `Request.launchable` requests without waiting for its tokens.

        `picks[i]`, where not None, is the row of `previous.tokens` (a launched step whose
        tokens are not read yet) holding item i's input token: the item is `pending`, its
        token taken on the device. Nothing here waits for the device."""
        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            graphs = self.graphs
            in_graph = None if graphs is None else graph_rows(items, graphs.sizes, picks)
            if in_graph is not None:
                assert graphs is not None
                if previous is not None and not previous.in_graph:
                    graphs.adopt_greedy(previous.tokens)  # ran eagerly: not the graphs' ids
                if len(in_graph.ids) > len(items):
                    self.graph_prompt_steps += 1
                _, greedy = graphs.run(in_graph.positions, in_graph.tables, in_graph.ids)
                host, ready = graphs.greedy_to_host(greedy)
                sample_rows = in_graph.sample_rows
                # as many sampled rows as items: every item samples (a decode step)
                every = len(sample_rows) == len(items)
                samplers = items if every else [it for it in items if it.samples]
                return LaunchedStep(samplers, sample_rows, greedy, host, ready, in_graph=True)
            batch = self._prepare(
                SchedulerOutput(items), picks, None if previous is None else previous.tokens
            )
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn_meta)
            logits = self.model.compute_logits(hidden[batch.logits_indices], float32=False)
            greedy = argmax_rows(logits)  # one row per sampling item, in batch.sample_rows order
            samplers, rows = batch.sample_rows, list(range(len(batch.sample_rows)))
            if not cuda:  # it ran synchronously
                return LaunchedStep(samplers, rows, greedy, greedy, None)
            host = torch.empty(greedy.shape, dtype=greedy.dtype, pin_memory=True)
            host.copy_(greedy, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            return LaunchedStep(samplers, rows, greedy, host, ready)

    @staticmethod
    def finish(launched: LaunchedStep) -> dict[str, int]:
        """The launched step's sampled token ids by request id (waits for that step only)."""
        if launched.ready is not None:
            launched.ready.synchronize()
        tokens: list[int] = launched.host_tokens.tolist()
        return {
            it.request.request_id: tokens[r]
            for it, r in zip(launched.samplers, launched.rows, strict=True)
        }

    def _execute_eager(
        self, scheduled: SchedulerOutput, out: ModelRunnerOutput
    ) -> ModelRunnerOutput:
        batch = self._prepare(scheduled)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn_meta)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # (R, vocab) float32
        if batch.sample_rows:
            self._sample(logits[: len(batch.sample_rows)], batch.sample_rows, out)
        for piece in batch.prompt_slices:
            targets = torch.tensor(piece.targets, device=self.device)
            out.prompt_logprobs[piece.request_id] = compute_prompt_logprobs(
                logits[piece.rows], targets, piece.num_top
            )
        return out

    def _sample(
        self,
        logits: torch.Tensor,  # (N, vocab), float32 or (from a decode graph) the model's dtype
        items: list[ScheduledRequest],
        out: ModelRunnerOutput,
        greedy: torch.Tensor | None = None,  # (N,) argmax of `logits`, if already computed
    ) -> None:
        if all(s.request.plain_greedy for s in items):  # argmax is all there is to do
            if greedy is None:
                greedy = logits.argmax(dim=-1)
            for item, token in zip(items, greedy.tolist(), strict=True):
                out.sampled[item.request.request_id] = token
            return
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
        meta = SamplingMetadata.build(rows, self.config.model.vocab_size, self.device)
        result = self.sampler(logits, meta)
        tokens = result.sampled_token_ids.tolist()
        for i, item in enumerate(items):
            request_id = item.request.request_id
            out.sampled[request_id] = tokens[i]
            if result.logprobs is not None and item.request.params.logprobs is not None:
                out.logprobs[request_id] = _row(result.logprobs, i)

    def _prepare(
        self,
        scheduled: SchedulerOutput,
        picks: Sequence[int | None] | None = None,
        previous: torch.Tensor | None = None,
    ) -> _BatchInputs:
        """The step's inputs, built with a fixed number of tensor operations whatever the
        number of sequences (the host's work per step matters at large batches), and moved to
        the device by two copies from pinned memory that do not wait for it (a step may be
        prepared while the one before runs). `picks[i]`, where not None, is the row of
        `previous` (a launched step's argmax, on the device) holding item i's input token."""
        bs = self.block_size
        # One-row chunks (decodes) first, in order: the attention backend takes the leading
        # ones through its decode kernel (AttentionMetadata.padded's `num_decodes`).
        picks = picks or [None] * len(scheduled.scheduled)
        order = sorted(range(len(picks)), key=lambda i: scheduled.scheduled[i].num_tokens > 1)
        tokens: list[int] = []
        starts, counts = [], []
        query_start_loc, seq_lens = [0], []
        sample_idx: list[int] = []
        sample_rows: list[ScheduledRequest] = []
        prompt_idx: list[int] = []
        prompt_pieces: list[tuple[str, int, list[int], int]] = []
        taken_at: list[int] = []  # rows whose input id is in `previous`
        taken_from: list[int] = []  # ... at these rows of it
        items = []
        for i in order:
            item = scheduled.scheduled[i]
            items.append(item)
            request, n = item.request, item.num_tokens
            start = request.num_computed_tokens  # item.start, without the call (per item)
            end, offset = start + n, query_start_loc[-1]
            all_ids = request.all_token_ids
            pick = picks[i]
            if pick is None:
                tokens.extend(all_ids[start:end])
            else:
                taken_at.append(offset)
                taken_from.append(pick)
                tokens.append(0)
            starts.append(start)
            counts.append(n)
            query_start_loc.append(offset + n)
            seq_lens.append(end)
            if end >= len(all_ids):  # item.samples (a pending token is not in all_ids yet)
                sample_idx.append(offset + n - 1)
                sample_rows.append(item)
            if request.params.prompt_logprobs is not None:
                piece = self._prompt_logprob_rows(item, offset)
                if piece is not None:
                    prompt_pieces.append(
                        (request.request_id, len(prompt_idx), piece[1], piece[2])
                    )
                    prompt_idx.extend(piece[0])
        first = len(sample_idx)
        prompt_slices = [
            _PromptLogprobsSlice(rid, slice(first + at, first + at + len(t)), t, k)
            for rid, at, t, k in prompt_pieces
        ]
        lengths = [len(item.block_ids) for item in items]
        width = max(lengths)
        padded = np.zeros((len(items), width), dtype=np.int32)
        fill_rows(padded, [item.block_ids for item in items], lengths)
        table = torch.from_numpy(padded)
        # Token t of sequence i (row `rows[t]`) sits at position start_i + (t - first row of i).
        num_tokens, num_seqs = query_start_loc[-1], len(items)  # T, S
        num = torch.tensor(counts)
        rows = torch.repeat_interleave(torch.arange(num_seqs), num)
        shift = torch.tensor(starts) - torch.tensor(query_start_loc[:-1])
        positions = torch.arange(num_tokens) + shift[rows]
        slots = table[rows, positions // bs].long() * bs + positions % bs
        # Two staging buffers, one per dtype, each moved by one copy
        ids, positions, slots, logits_indices, dst, src = self._staging(
            torch.long,
            torch.tensor(tokens),
            positions,
            slots,
            torch.tensor(sample_idx + prompt_idx, dtype=torch.long),
            torch.tensor(taken_at, dtype=torch.long),
            torch.tensor(taken_from, dtype=torch.long),
        )
        lens, cu_seqlens, flat_table = self._staging(
            torch.int32,
            torch.tensor(seq_lens, dtype=torch.int32),
            torch.tensor(query_start_loc, dtype=torch.int32),
            table.flatten(),
        )
        if taken_at:
            assert previous is not None, "picks name rows of a previous step's tokens"
            ids[dst] = previous[src]  # on the device: not known here yet
        meta = AttentionMetadata.from_table(
            slots, query_start_loc, seq_lens, flat_table.view(num_seqs, width)
        )
        meta.set_padded(lens, cu_seqlens)
        return _BatchInputs(
            input_ids=ids,
            positions=positions,
            attn_meta=meta,
            logits_indices=logits_indices,
            sample_rows=sample_rows,
            prompt_slices=prompt_slices,
        )

    def _staging(self, dtype: torch.dtype, *parts: torch.Tensor) -> list[torch.Tensor]:
        """`parts` on the device, in `dtype`: concatenated in pinned memory, moved by one copy
        that does not wait for the device (torch keeps the pinned block until the copy ran),
        and split again into views."""
        converted = [part.to(dtype) for part in parts]
        sizes = [part.numel() for part in parts]
        if self.device.type != "cuda":
            return list(torch.cat(converted).split(sizes))
        host = torch.empty(sum(sizes), dtype=dtype, pin_memory=True)
        torch.cat(converted, out=host)
        return list(host.to(self.device, non_blocking=True).split(sizes))

    def _prompt_logprob_rows(
        self, item: ScheduledRequest, offset: int
    ) -> tuple[list[int], list[int], int] | None:
        """Batch rows, target tokens and top-k count for the prompt logprobs of this chunk."""
        request = item.request
        num_top = request.params.prompt_logprobs
        if num_top is None:
            return None
        lo = max(item.start, request.prompt_logprob_pos)
        hi = min(item.start + item.num_tokens, request.num_prompt_tokens - 1)
        if hi <= lo:
            return None
        rows = list(range(offset + lo - item.start, offset + hi - item.start))
        if num_top == -1:
            num_top = self.config.model.vocab_size
        return rows, request.prompt_token_ids[lo + 1 : hi + 1], num_top


def _row(t: LogprobsTensors, i: int) -> LogprobsTensors:
    return LogprobsTensors(
        token_ids=t.token_ids[i : i + 1], logprobs=t.logprobs[i : i + 1], ranks=t.ranks[i : i + 1]
    )
