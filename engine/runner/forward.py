"""The forward pass as a strategy, chosen per step by `ModelRunner`.

    GraphForward   replays a captured decode graph (engine.cuda_graphs): decode steps and
                   short prompt chunks, as `graph_rows` lays them out
    EagerForward   the model op by op on the GPU: any step, a KV connector's layer hook
    CpuForward     the same on the CPU, where nothing runs ahead of the host

Each runs a step to completion (`complete`: sampled, tokens read) or launches it ahead
(`launch`, asynchronous scheduling: plain greedy, its argmax left on the device and copied to
pinned host memory without waiting).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.cuda_graphs import DecodeGraphs, GraphRows, argmax_rows, graph_rows
from engine.models.llama import LlamaForCausalLM
from engine.runner.handle import LaunchedStep, ModelRunnerOutput
from engine.runner.inputs import prepare_batch
from engine.runner.sample import StepSampler, keep_hidden
from engine.sampling.logprobs import compute_prompt_logprobs
from engine.scheduler.output import ScheduledRequest


class GraphForward:
    """Steps run as rows of a captured decode graph; `rows` says whether a step qualifies."""

    def __init__(
        self,
        graphs: DecodeGraphs,
        sampling: StepSampler,
        hidden: torch.Tensor | None = None,
        states: torch.Tensor | None = None,
    ) -> None:
        self.graphs = graphs
        self.sampling = sampling
        self.hidden = hidden  # (B_max, H) each replay's final hidden states, if a drafter reads
        self.states = states  # (B_max, W) each replay's EAGLE states (`keep_states`), if kept
        self.prompt_steps = 0  # steps whose prompt chunks ran in a decode graph

    def rows(
        self, items: list[ScheduledRequest], picks: Sequence[int | None] | None = None
    ) -> GraphRows | None:
        """The step as graph rows, or None when it runs eagerly (`graph_rows`)."""
        return graph_rows(items, self.graphs.sizes, picks)

    def _replay(
        self, items: list[ScheduledRequest], rows: GraphRows
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (S, vocab) logits, (S,) argmax ids
        if len(rows.ids) > len(items):
            self.prompt_steps += 1
        return self.graphs.run(rows.positions, rows.tables, rows.ids)

    def complete(self, items: list[ScheduledRequest], rows: GraphRows) -> ModelRunnerOutput:
        """Replay, then sample the rows that sample (plain greedy: the graph's argmax)."""
        out = ModelRunnerOutput()
        logits, greedy = self._replay(items, rows)
        samplers = [it for it in items if it.samples]
        sample_rows = rows.sample_rows
        drafts = any(it.draft_token_ids for it in samplers)  # rows verifying them
        if len(sample_rows) == len(rows.ids):  # every row samples: decodes (and drafts)
            self.sampling.sample(logits, samplers, out, None if drafts else greedy)
        elif not drafts and all(it.request.plain_greedy for it in samplers):
            picked = greedy.tolist()  # (rows,): cheaper read whole than indexed on the device
            for item, row in zip(samplers, sample_rows, strict=True):
                out.sampled[item.request.request_id] = picked[row]
        elif samplers:
            rows_at = torch.tensor(sample_rows, device=logits.device)
            self.sampling.sample(logits[rows_at], samplers, out)
        if self.hidden is not None and samplers:
            at = torch.tensor(sample_rows, device=logits.device)
            keep_hidden(self.hidden.index_select(0, at), samplers, out)
        if self.states is not None:  # a copy: EAGLE may hold rows past the next replay
            keep_states(self.states[: len(rows.ids)].clone(), items, out)
        return out

    def launch(
        self, items: list[ScheduledRequest], rows: GraphRows, previous: LaunchedStep | None
    ) -> LaunchedStep:
        """Replay without reading the tokens; the argmax goes to pinned host memory once the
        step is finished (at once, unless a sampler has a grammar: `LaunchedStep.finish`)."""
        if previous is not None and not previous.in_graph:
            self.graphs.adopt_greedy(previous.tokens)  # ran eagerly: not the graphs' ids
        logits, greedy = self._replay(items, rows)
        sample_rows = rows.sample_rows
        # as many sampled rows as items: every item samples (a decode step)
        every = len(sample_rows) == len(items)
        samplers = items if every else [it for it in items if it.samples]
        step = LaunchedStep(samplers, sample_rows, greedy, self.graphs.greedy_to_host)
        return self.sampling.launched(step, logits)


class EagerForward:
    """The model's forward pass op by op, over a ragged batch (engine.runner.inputs)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[torch.Tensor],
        sampling: StepSampler,
        block_size: int,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sampling = sampling
        self.block_size = block_size
        self.keep_hidden = False  # record the sampled rows' hidden states (a drafter reads them)
        # EAGLE: record every row's states whose next token is known (`keep_states`): () the
        # final hidden state, else the residual stream entering these layers, concatenated
        self.state_layers: tuple[int, ...] | None = None

    def complete(
        self, items: list[ScheduledRequest], layer_hook: Callable[[int], None] | None = None
    ) -> ModelRunnerOutput:
        """Run and sample; `layer_hook(i)`, if given, runs right after layer i."""
        if layer_hook is None:
            return self._complete(items)
        self.model.model.layer_hook = layer_hook
        try:
            return self._complete(items)
        finally:
            self.model.model.layer_hook = None

    def _complete(self, items: list[ScheduledRequest]) -> ModelRunnerOutput:
        out = ModelRunnerOutput()
        sampling = self.sampling
        batch = prepare_batch(items, self.block_size, sampling.vocab_size, sampling.device)
        layers = self.state_layers
        if layers is None:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn_meta)
        else:
            hidden, aux = self.model.forward_with_aux(
                batch.input_ids, batch.positions, self.kv_caches, batch.attn_meta, layers
            )
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # (R, vocab) float32
        if batch.sample_rows:
            sampling.sample(logits[: batch.num_sampled], batch.sample_rows, out)
            if self.keep_hidden:
                rows = batch.logits_indices[: batch.num_sampled]
                keep_hidden(hidden[rows], batch.sample_rows, out)
        if layers is not None:  # after sampling: a verifying row's accepted drafts are known
            keep_states(torch.cat(aux, dim=-1) if layers else hidden, batch.items, out)
        for piece in batch.prompt_slices:
            targets = torch.tensor(piece.targets, device=sampling.device)
            out.prompt_logprobs[piece.request_id] = compute_prompt_logprobs(
                logits[piece.rows], targets, piece.num_top
            )
        return out

    def launch(
        self,
        items: list[ScheduledRequest],
        previous: LaunchedStep | None,
        picks: Sequence[int | None] | None,
    ) -> LaunchedStep:
        """Run without reading the tokens: one argmax row per sampling item, in batch order.
        `picks[i]`, where not None, is the row of `previous.tokens` holding item i's input."""
        sampling = self.sampling
        batch = prepare_batch(
            items, self.block_size, sampling.vocab_size, sampling.device,
            picks, None if previous is None else previous.tokens,
        )  # fmt: skip
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.attn_meta)
        logits = self.model.compute_logits(hidden[batch.logits_indices], float32=False)
        greedy = argmax_rows(logits)  # (R,) one row per sampling item, in sample_rows order
        rows = list(range(len(batch.sample_rows)))
        return sampling.launched(
            LaunchedStep(batch.sample_rows, rows, greedy, self._copy_out), logits
        )

    @staticmethod
    def _copy_out(greedy: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Queue the ids' copy to pinned host memory; an event once they are there."""
        host = torch.empty(greedy.shape, dtype=greedy.dtype, pin_memory=True)
        host.copy_(greedy, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready


class CpuForward(EagerForward):
    """`EagerForward` on the CPU: a launched step has run by the time `launch` returns."""

    @staticmethod
    def _copy_out(greedy: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        return greedy, None


def keep_states(
    states: torch.Tensor, items: list[ScheduledRequest], out: ModelRunnerOutput
) -> None:
    """Record in `out.states` each item's rows of `states` (T, D: the items' rows in order)
    whose next token is known
    (EAGLE feeds them to its head): all of a chunk's rows (the next prompt token, or the one
    sampled after the last), but of a verifying chunk only its known token's row and the
    accepted drafts' (the rejected drafts' states are of tokens the request does not have)."""
    at = 0
    for item in items:
        request_id = item.request.request_id
        rows = item.num_tokens - len(item.draft_token_ids) + len(out.accepted.get(request_id, ()))
        out.states[request_id] = (item.start, states[at : at + rows])
        at += item.num_tokens
