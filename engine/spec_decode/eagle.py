"""EAGLE speculative decoding (`"method": "eagle"` and `"eagle3"`): a draft head over the
target's hidden states (engine.spec_decode.eagle_head) drafts greedily.

The target's steps record, per request, the states of the positions whose next token is known
(`Request.spec_states`: a prompt chunk's rows, a verify step's rows up to its last accepted
draft). The head's paged KV cache (one layer, its own blocks) holds one entry per position i
fed with (t(i + 1), state(i)), from the first position it has a state for::

    tokens:  t0 ... t(n-1)             n = request.num_tokens; t(n-1) the last sampled
    cache:   entries offset .. n - 2   (t(i + 1), h(i)): every state is of a verified token
    drafts:  row n - 2 gives d1; then (d1, g) at n - 1 gives d2, ... (g: the head's own state)

The chain's entries (positions n - 1 ..) are overwritten by the next call's catch-up, which
feeds the states that came since. A gap in the states (a prefix hit on a request the head
never saw, KV from a prefill worker that sent none, a preempted request whose entries were
evicted) restarts the request's entries at the first position after it: the head then
attends over fewer positions (drafts may be worse; the target verifies every one). Across the
prefill -> decode hand-off the prefill worker sends the prompt's states with the KV
(`save_states`), so the first decode step drafts. The head runs eagerly, and so do the
target's steps (their states are every row's, not kept by the decode graphs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from engine.attention import AttentionMetadata
from engine.config import KernelConfig, SpeculativeConfig
from engine.kv_connector.base import KVConnectorWorker
from engine.layers import Kernels
from engine.request import Request
from engine.spec_decode.draft_model import DraftKVCache
from engine.spec_decode.eagle_head import EagleHead, load_eagle_head
from engine.spec_decode.proposer import DrafterContext, Proposer

STATES_EXTRA = "eagle_states"  # (m, D) the prompt's states, sent with its KV
STATES_START_EXTRA = "eagle_states_start"  # (1,) int64 the position of the first
MAX_STATES_BYTES = 32 << 20  # a hand-off carries at most this much (the prompt's last states)

States = tuple[int, torch.Tensor]  # (first position, (m, D) states of it and the m - 1 after)


def merge_states(entries: Sequence[States]) -> States | None:
    """One contiguous run ending with the last entry's: a later entry that starts after the run
    ends (a gap) or covers it (a recompute) starts a new run; overlaps are skipped (states of
    the same verified tokens)."""
    if not entries:
        return None
    start, parts = entries[0][0], [entries[0][1]]
    end = start + entries[0][1].shape[0]
    for first, states in entries[1:]:
        last = first + states.shape[0]
        if first > end or (first <= start and last >= end):
            start, parts, end = first, [states], last
        elif last > end:
            parts.append(states[end - first :])
            end = last
    return start, parts[0] if len(parts) == 1 else torch.cat(parts)


MAX_PENDING_STATES = 4096  # rows a request holds for the head between its drafts


def bound_states(entries: list[States]) -> None:
    """Keep at most MAX_PENDING_STATES rows of a request's states not yet fed to the head
    (a request that does not draft for a while: prompt logprobs owed, `disable_by_batch_size`,
    a long prompt in chunks): the last ones. The head then sees a gap and restarts its
    entries after it (drafts worse for a while, outputs unchanged)."""
    if sum(states.shape[0] for _, states in entries) <= MAX_PENDING_STATES:
        return
    merged = merge_states(entries)
    assert merged is not None
    start, rows = merged
    kept = rows[-MAX_PENDING_STATES:]
    entries[:] = [(start + rows.shape[0] - kept.shape[0], kept)]


def save_states(
    worker: KVConnectorWorker, requests: dict[str, Request], step: dict[str, States]
) -> None:
    """Prefill role: each request whose KV goes elsewhere takes its prompt's states along
    (`STATES_EXTRA`, at most `MAX_STATES_BYTES`: its last positions), so the decode engine's
    head drafts from the first decode step. Layer-wise pushes take extras before the step runs:
    too late, the head there starts from its first decode step's state."""
    for request_id, states in step.items():
        if not worker.takes_extras(request_id):
            continue
        merged = merge_states([*requests[request_id].spec_states, states])
        assert merged is not None
        start, rows = merged
        row_bytes = rows.shape[1] * rows.element_size()
        keep = min(rows.shape[0], MAX_STATES_BYTES // row_bytes)
        start, rows = start + rows.shape[0] - keep, rows[rows.shape[0] - keep :]
        worker.save_extras(request_id, {
            STATES_EXTRA: rows.clone(),
            STATES_START_EXTRA: torch.tensor([start], dtype=torch.long),
        })  # fmt: skip


def states_from_extras(extras: Mapping[str, torch.Tensor]) -> States | None:
    """Decode role: the states a hand-off brought (`save_states`), or None."""
    if not extras or STATES_EXTRA not in extras or STATES_START_EXTRA not in extras:
        return None
    return int(extras[STATES_START_EXTRA][0]), extras[STATES_EXTRA]


@dataclass(slots=True)
class HeadEntries:
    """What the head's cache holds of one request: positions offset .. end - 1, entry j at
    position offset + j; `last` is the target state of position end - 1 (refed when no new
    state came since)."""

    offset: int
    end: int
    last: torch.Tensor  # (D,)


@dataclass(slots=True)
class Feed:
    """Rows to run for one request: tokens t(start + 1) .. at positions start .., with their
    states (the target's, or the head's own when chaining)."""

    request_id: str
    offset: int
    start: int
    tokens: list[int]
    states: torch.Tensor  # (len(tokens), D)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class EagleProposer(Proposer):
    """Drafts with an EAGLE head over the target's states, batched over the requests asked (see
    the module doc); `state_layers` tells the engine which states its steps must keep."""

    def __init__(self, config: SpeculativeConfig, context: DrafterContext, eagle3: bool) -> None:
        super().__init__(config)
        assert config.model is not None  # SpeculativeConfig requires it for this method
        if context.target_model is None:
            raise ValueError(f"speculative_config.method {config.method!r} needs the target model")
        self.device = context.device
        kernels = Kernels.choose(KernelConfig(), self.device, context.dtype)
        self.head: EagleHead = load_eagle_head(
            config.model, eagle3, context.model, self.device, kernels
        )
        target = context.target_model
        self.head.share(target.model.embed_tokens, target.lm_head)
        self.state_layers = self.head.config.aux_layers
        size = context.block_size
        num_blocks = context.num_blocks or -(-context.model.max_model_len // size)
        self.cache = DraftKVCache(self.head.config.layer, num_blocks, size, self.device)
        self.entries: dict[str, HeadEntries] = {}
        self.num_restarts = 0  # requests whose entries restarted after a gap in their states

    def finished(self, request: Request) -> None:
        self.entries.pop(request.request_id, None)
        self.cache.free(request.request_id)

    def propose(self, requests: Sequence[Request], max_drafts: Sequence[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in requests]
        asked = {r.request_id for r in requests}
        rows, feeds, wants = [], [], []
        for i, request in enumerate(requests):
            want = min(max_drafts[i], self.head.config.layer.max_model_len - request.num_tokens)
            feed = self._catch_up(request, want, asked) if want > 0 else None
            if feed is not None:
                rows.append(i)
                feeds.append(feed)
                wants.append(want)
        if not feeds:
            return drafts
        cuda = self.device.type == "cuda"
        with torch.inference_mode(), torch.cuda.device(self.device) if cuda else (
            contextlib.nullcontext()
        ):
            out = self._draft(feeds, wants)
        for i, tokens in zip(rows, out, strict=True):
            drafts[i] = tokens
        return drafts

    def _catch_up(self, request: Request, want: int, asked: set[str]) -> Feed | None:
        """The rows that bring the request's entries up to position n - 2, with room reserved
        for `want` drafts; None (its new states kept for later) when its states do not reach
        n - 2 or the cache has no room."""
        rid, end = request.request_id, request.num_tokens - 1  # entries up to position end - 1
        held = self.entries.get(rid)
        pending = merge_states(request.spec_states)
        request.spec_states.clear()
        rows = _rows(held, pending, end)
        if rows is None:
            request.spec_states.extend([pending] if pending is not None else [])
            return None
        start, states, restart = rows
        if restart or held is None:
            self.cache.free(rid)
            self.num_restarts += held is not None
            held = self.entries[rid] = HeadEntries(start, start, states[0])
        if not self._reserve(rid, end + want - 1 - held.offset, asked):
            request.spec_states.extend([pending] if pending is not None else [])
            return None
        return Feed(rid, held.offset, start, request.all_token_ids[start + 1 : end + 1], states)

    def _reserve(self, request_id: str, num_entries: int, asked: set[str]) -> bool:
        if self.cache.reserve(request_id, num_entries):
            return True
        for other in [r for r in self.entries if r not in asked]:
            self.entries.pop(other)
            self.cache.free(other)  # it restarts from the states that come after
            if self.cache.reserve(request_id, num_entries):
                return True
        return False

    def _draft(self, feeds: list[Feed], wants: list[int]) -> list[list[int]]:
        """A catch-up pass over every feed, then one-row passes chaining the head's state."""
        g, tokens = self._forward(feeds)
        out = [[t] for t in tokens]
        for feed in feeds:
            held = self.entries[feed.request_id]
            held.end, held.last = feed.end, feed.states[-1].clone()
        for step in range(1, max(wants)):
            active = [i for i, want in enumerate(wants) if want > step]
            steps = [Feed(feeds[i].request_id, feeds[i].offset, feeds[i].end + step - 1,
                          [out[i][-1]], g[i][None]) for i in active]  # fmt: skip
            g_next, tokens = self._forward(steps)
            for row, (i, token) in enumerate(zip(active, tokens, strict=True)):
                out[i].append(token)
                g[i] = g_next[row]
        return out

    def _forward(self, feeds: list[Feed]) -> tuple[torch.Tensor, list[int]]:
        """One ragged pass writing each feed's entries: the head's state (S, H) after each
        feed's last row, and the greedy token it drafts."""
        order = sorted(range(len(feeds)), key=lambda i: len(feeds[i].tokens))  # decodes first
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        for i in order:
            feed = feeds[i]
            ids += feed.tokens
            positions += range(feed.start, feed.end)
            slots += self.cache.slots(feed.request_id, feed.start - feed.offset,
                                      feed.end - feed.offset)  # fmt: skip
            starts.append(starts[-1] + len(feed.tokens))
        device = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_start_loc=starts,
            seq_lens=[feeds[i].end - feeds[i].offset for i in order],
            block_tables=[self.cache.table(feeds[i].request_id, feeds[i].end - feeds[i].offset)
                          for i in order],  # fmt: skip
        )
        g = self.head(
            torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(positions, dtype=torch.long, device=device),
            torch.cat([feeds[i].states for i in order]),
            self.cache.kv_caches[0],
            meta,
        )  # (T, H)
        last = g[torch.tensor(starts[1:], device=device) - 1]  # (S, H) in `order`
        back = torch.empty(len(order), dtype=torch.long, device=device)
        back[torch.tensor(order, device=device)] = torch.arange(len(order), device=device)
        last = last[back]  # (S, H) in feed order
        return last, self.head.draft(last).tolist()


def _rows(
    held: HeadEntries | None, pending: States | None, end: int
) -> tuple[int, torch.Tensor, bool] | None:
    """(first position to feed, the states from it through position end - 1, whether the
    entries restart there), or None when the states do not reach position end - 1. With no
    new state, the last entry is fed again: its output gives the first draft."""
    if pending is not None:
        start, states = pending
        stop = start + states.shape[0]
        if held is not None and held.offset <= start <= held.end:  # continues the entries
            if max(stop, held.end) != end:
                return None
            if stop > held.end:
                return held.end, states[held.end - start :], False
        elif stop == end:  # none held yet, or a gap before `start`, or more context
            return start, states, True
        else:
            return None
    if held is None or held.end != end or held.end == held.offset:
        return None
    return held.end - 1, held.last[None], False
