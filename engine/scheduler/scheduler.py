"""Continuous batching with chunked prefill and preemption by recompute.

Each step has a budget of `max_num_batched_tokens`. Running requests are served first, in
order: a decoding request computes 1 token, a request still prefilling computes the next chunk
of its prompt. Then waiting requests are admitted while budget, sequence slots and free blocks
last. When a running request needs a block and none is free, the request at the back of the
running list is preempted: its blocks are freed and it waits to be recomputed from scratch
(prompt plus what it has generated so far), ahead of new arrivals.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet

from engine.config import SchedulerConfig
from engine.errors import EngineOverloadedError
from engine.kv_cache.block_pool import KVCacheBlock
from engine.kv_cache.manager import KVCacheManager
from engine.kv_connector.base import FinishedTransfers, KVConnectorScheduler
from engine.outputs import EngineCoreOutput
from engine.request import Request, RequestStatus
from engine.scheduler.output import ScheduledRequest, SchedulerOutput
from engine.scheduler.policies import SchedulingPolicy, make_policy
from engine.scheduler.queues import RequestQueue
from engine.spec_decode.stats import SpecDecodeStats


class Scheduler:
    """Decides each step's batch and applies the step's sampled tokens.

    A KV connector (engine.kv_connector), if any, decides which requests' KV comes from another
    engine (they wait, blocks allocated, until it has arrived), which ones hand off to another
    engine after their first token, and what each step saves or loads."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        max_model_len: int,
        policy: SchedulingPolicy | None = None,
        connector: KVConnectorScheduler | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.policy = policy or make_policy(config.policy, config.aging_seconds)
        self.connector = connector
        self.waiting: RequestQueue = self.policy.new_queue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0  # since start, for metrics and tests
        self.spec_stats = SpecDecodeStats()  # speculative decoding: drafts verified, accepted
        self.num_steps = 0
        self.waiting_for_kv: dict[str, Request] = {}  # blocks allocated, KV from elsewhere
        self.waiting_for_grammar: dict[str, Request] = {}  # structured outputs: compiling
        self._hand_offs: set[str] = set()  # end after their first token (`hands_off`)
        self._saving: dict[str, Request] = {}  # finished; blocks held for the connector's save
        # Called with each request as it finishes or hands off, on the engine thread (the
        # drafter's per-request state; the worker's per-request metrics).
        self.finish_listeners: list[Callable[[Request], None]] = []
        self.num_batched_tokens = 0  # tokens of the latest step scheduled (metrics)

    def add_request(self, request: Request) -> None:
        """Queue a new request; EngineOverloadedError if `max_num_waiting` are already waiting.

        If the connector says its prompt's KV comes from elsewhere, its blocks are allocated
        now (EngineOverloadedError if they are not free) and it waits for that KV instead."""
        rid = request.request_id
        if rid in self.requests or rid in self._saving:
            raise ValueError(f"request_id {rid!r} is already running")
        if self.connector is not None:
            hits, num_external = self._external_tokens(request)
            if num_external:
                self._wait_for_kv(request, hits, num_external)
                return
        limit = self.config.max_num_waiting
        if limit is not None and len(self.waiting) >= limit:
            raise EngineOverloadedError(len(self.waiting), limit)
        if self.connector is not None and self.connector.hands_off(request):
            self._hand_offs.add(rid)
        self.requests[rid] = request
        if request.grammar is not None and not request.grammar.ready:
            request.status = RequestStatus.WAITING_FOR_GRAMMAR  # not scheduled until compiled
            self.waiting_for_grammar[rid] = request
            return
        self.waiting.add(request)

    def update_from_grammars(self) -> list[tuple[Request, BaseException]]:
        """Queue the requests whose grammar finished compiling; finish (aborted) those whose
        compile failed and return them with the error."""
        failed = []
        waiting = self.waiting_for_grammar
        for rid in [rid for rid, r in waiting.items() if r.grammar is None or r.grammar.ready]:
            request = waiting.pop(rid)
            error = None if request.grammar is None else request.grammar.error()
            if error is not None:
                self._free(request, RequestStatus.FINISHED_ABORTED)
                failed.append((request, error))
                continue
            request.status = RequestStatus.WAITING
            self.waiting.add(request)
        return failed

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def holds_blocks(self) -> bool:
        """True while a request holds blocks: unfinished, or finished with its blocks kept for
        the connector's save."""
        return bool(self.requests) or bool(self._saving)

    def has_work(self) -> bool:
        """True when a step would compute something (requests waiting for KV need no step)."""
        return bool(self.waiting) or bool(self.running)

    def _external_tokens(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The prefix-cache hits to keep, and how many prompt tokens' KV comes from elsewhere
        (`KVConnectorScheduler.get_num_new_matched_tokens`)."""
        assert self.connector is not None
        hits = self.kv.get_computed_blocks(request)
        bs, prompt = self.kv.block_size, request.num_prompt_tokens
        num_external = self.connector.get_num_new_matched_tokens(request, len(hits) * bs)
        local = prompt - num_external
        if num_external and (num_external < 0 or local < 0 or local % bs or local > len(hits) * bs):
            raise RuntimeError(
                f"KV connector: {num_external} external tokens do not complete prompt "
                f"{request.request_id!r} ({prompt} tokens, {len(hits) * bs} cached, block "
                f"size {bs})"
            )
        return hits[: local // bs] if num_external else hits, num_external

    def _wait_for_kv(self, request: Request, hits: list[KVCacheBlock], num_external: int) -> None:
        """Allocate every block of the prompt now; the request waits for its KV."""
        assert self.connector is not None
        if not self.kv.allocate_slots(request, num_external, hits):
            raise EngineOverloadedError(len(self.waiting_for_kv), self.kv.num_free_blocks())
        num_cached = len(hits) * self.kv.block_size
        self.kv.stats.queries += request.num_tokens
        self.kv.stats.hits += num_cached
        request.status = RequestStatus.WAITING_FOR_KV
        request.num_cached_tokens = num_cached
        self.requests[request.request_id] = request
        self.waiting_for_kv[request.request_id] = request
        block_ids = self.kv.block_ids(request.request_id)
        self.connector.update_state_after_alloc(request, list(block_ids), num_external)

    def update_from_connector(self, finished: FinishedTransfers) -> list[Request]:
        """Apply the connector's finished transfers: free the blocks of finished saves; queue
        the requests whose KV arrived to decode on after the tokens sampled elsewhere, ahead of
        new arrivals. Returns those requests (arrivals of requests finished since are dropped).
        A structured request whose grammar is still compiling here (or failed) waits for it
        (`update_from_grammars`) as a new one does, holding its blocks: the step never blocks
        on a compile.
        """
        for request_id in finished.saved:
            request = self._saving.pop(request_id, None)
            if request is not None:
                self.kv.free(request)
        resumed = []
        for request_id, output_token_ids in finished.loaded:
            request = self.waiting_for_kv.pop(request_id, None)
            if request is None:
                continue
            request.num_computed_tokens = request.num_prompt_tokens
            request.times.first_scheduled = time.time()
            self.kv.cache_blocks(request)
            for token in output_token_ids:
                request.append_output_token(token)
            grammar = request.grammar
            if grammar is not None and (not grammar.ready or grammar.error() is not None):
                request.status = RequestStatus.WAITING_FOR_GRAMMAR
                self.waiting_for_grammar[request_id] = request
            else:
                request.status = RequestStatus.WAITING
                self.waiting.prepend(request)
            resumed.append(request)
        return resumed

    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_running(self) -> int:
        return len(self.running)

    def num_waiting_for_kv(self) -> int:
        return len(self.waiting_for_kv)

    def num_prompt_tokens_waiting(self) -> int:
        """Tokens queued here to prefill and not computed yet: all of each waiting request's
        uncomputed tokens (new, preempted, or compiling its grammar; prefix-cache hits not
        known yet) and the rest of each running prompt still in chunked prefill. Requests
        waiting for KV from a prefill worker are not counted. The autoscaler's prefill load."""
        compiling = self.waiting_for_grammar.values()
        total = sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)
        total += sum(r.num_tokens - r.num_computed_tokens for r in compiling)
        for r in self.running:
            if r.num_computed_tokens < r.num_prompt_tokens:
                total += r.num_prompt_tokens - r.num_computed_tokens
        return total

    def schedule(self) -> SchedulerOutput:
        return self._schedule(pending=frozenset(), skip=frozenset())

    def schedule_next(self, launched: SchedulerOutput) -> SchedulerOutput | None:
        """Asynchronous scheduling: the step after `launched`, a step whose sampled tokens are
        still on the device (not read), decided without them; None when it cannot be.

        A request that samples in `launched` is one token longer than it knows: the next step
        computes that token (its input id taken on the device, `ScheduledRequest.pending`),
        unless the token reaches its length limit (then it is left out, and finishes when the
        tokens are read). One that `launched` ends by a stop token is found only when its
        tokens are read; its row in the next step is then dropped. Otherwise the step is what
        `schedule()` would decide once the tokens are read: prompts go on chunk by chunk,
        waiting requests are admitted, a full cache preempts (a victim's unread token is
        dropped, and computed again when it resumes). `launched` then counts as computed
        (`advance`); the step may be empty. None (and `launched` not advanced) when `launched`
        holds a request that hands off (`KVConnectorScheduler.hands_off`: its first token ends
        it here).
        """
        hand_offs = self._hand_offs
        if hand_offs and any(it.request.request_id in hand_offs for it in launched.scheduled):
            return None
        pending, ending = set(), set()
        for request in self.advance(launched):
            if (
                len(request.output_token_ids) + 1 < request.max_tokens
                and len(request.all_token_ids) + 1 < self.max_model_len
            ):
                pending.add(request.request_id)
            else:
                ending.add(request.request_id)
        return self._schedule(pending, ending)

    def _schedule(self, pending: AbstractSet[str], skip: AbstractSet[str]) -> SchedulerOutput:
        """`schedule()`, where the running requests in `pending` have one more token than
        their `all_token_ids` (sampled on the device, not read) and those in `skip` sit out."""
        self.num_steps += 1
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        running, allocate = self.running, self.kv.allocate_slots
        i = 0  # running[:i] are scheduled or skipped
        while i < len(running) and budget > 0:  # (per-step host time: kept lean)
            request = running[i]
            rid = request.request_id
            if rid in skip:
                i += 1
                continue
            known = len(request.all_token_ids) + (rid in pending)
            num_tokens = min(known - request.num_computed_tokens, budget)
            drafts = request.spec_token_ids
            if drafts:  # speculative decoding: verify them in this step
                drafts = self._drafts(request, num_tokens, budget, rid in pending)
                num_tokens += len(drafts)
            if allocate(request, num_tokens):
                out.scheduled.append(self._scheduled(request, num_tokens, drafts))
                budget -= num_tokens
                i += 1
                continue
            if self._allocate_or_preempt(request, num_tokens, out):
                out.scheduled.append(self._scheduled(request, num_tokens, drafts))
            # Preemptions may have removed scheduled requests: recount from what remains, and
            # go on from the first running request neither scheduled nor sitting out.
            budget = self.config.max_num_batched_tokens - out.num_batched_tokens
            done = {id(s.request) for s in out.scheduled}
            i = next(
                (
                    j
                    for j, r in enumerate(running)
                    if id(r) not in done and r.request_id not in skip
                ),
                len(running),
            )
        if not out.preempted:
            self._admit_waiting(out, budget)
        if self.connector is not None:
            out.kv_connector_metadata = self.connector.build_connector_meta(out)
        self.num_batched_tokens = out.num_batched_tokens
        return out

    def prune(self, scheduled: SchedulerOutput) -> None:
        """Drop from `scheduled`, a step decided earlier and not run yet, the requests that
        finished since (aborted, or stopped when a step's tokens were read); its connector
        metadata is decided again."""
        running = RequestStatus.RUNNING
        scheduled.scheduled = [it for it in scheduled.scheduled if it.request.status == running]
        if self.connector is not None:
            scheduled.kv_connector_metadata = self.connector.build_connector_meta(scheduled)

    def advance(self, scheduled: SchedulerOutput) -> list[Request]:
        """Count the step's tokens as computed (its forward pass is queued) and index the
        blocks they fill. `update_from_output` does it unless `advanced` says it was done.
        Returns the requests whose tokens the step reached the end of (they sample)."""
        reached = []
        bs, cache_blocks = self.kv.block_size, self.kv.cache_blocks
        for item in scheduled.scheduled:
            request = item.request
            if request.status == RequestStatus.RUNNING:  # else finished meanwhile
                computed = request.num_computed_tokens = (  # drafts count once accepted
                    request.num_computed_tokens + item.num_tokens - len(item.draft_token_ids)
                )
                if item.num_tokens > 1 or computed % bs == 0:  # else no block filled up
                    cache_blocks(request)
                if computed >= len(request.all_token_ids):
                    reached.append(request)
        return reached

    def update_from_output(
        self,
        scheduled: SchedulerOutput,
        sampled: dict[str, int],
        advanced: bool = False,
        accepted: dict[str, list[int]] | None = None,
    ) -> list[EngineCoreOutput]:
        """Advance each scheduled request; append sampled tokens; finish stopped requests.
        `accepted` holds, for requests that verified drafts, the drafts accepted: they come
        before the sampled token (`_append_accepted`).

        Requests that finished since the step was scheduled (aborted, or stopped while an
        asynchronous step ran) are skipped: what the step computed for them is dropped."""
        if not advanced:
            self.advance(scheduled)
        outputs = []
        now = time.time()
        running = RequestStatus.RUNNING
        for item in scheduled.scheduled:  # (per-step host time: kept lean)
            request = item.request
            if request.status != running:
                continue
            token = sampled.get(request.request_id)
            if token is None:
                continue
            if item.draft_token_ids:
                assert accepted is not None, "a step with drafts reports the accepted ones"
                taken = accepted[request.request_id]
                self.spec_stats.observe(len(item.draft_token_ids), len(taken))
                outputs.append(self._append_accepted(request, taken, token))
                continue
            if request.grammar is not None and not request.grammar.advance(
                request.output_token_ids, token
            ):
                outputs.append(self._end_refused(request, token))
                continue
            request.output_token_ids.append(token)
            request.all_token_ids.append(token)
            times = request.times
            if times.first_token is None:
                times.first_token = now
            times.last_token = now
            outputs.append(self._check_stop(request, token))
        return outputs

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (abort, or stop for a stop string) the given requests and free their blocks."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status == RequestStatus.WAITING_FOR_KV:
                del self.waiting_for_kv[request_id]
            elif request.status == RequestStatus.WAITING_FOR_GRAMMAR:
                del self.waiting_for_grammar[request_id]
            else:
                self.waiting.remove(request)
            self._free(request, status)
            finished.append(request)
        return finished

    def _scheduled(
        self, request: Request, num_tokens: int, drafts: list[int] | None = None
    ) -> ScheduledRequest:
        block_ids = self.kv.block_ids(request.request_id)
        if drafts:
            return ScheduledRequest(request, num_tokens, block_ids, drafts)
        return ScheduledRequest(request, num_tokens, block_ids)

    def _drafts(self, request: Request, num_tokens: int, budget: int, pending: bool) -> list[int]:
        """The drafts of `request` its next step verifies: none unless it decodes one known
        token (a prompt chunk, or a token still on the device, has no drafts), capped by the
        token budget and so that no accepted draft passes max_tokens or max_model_len."""
        if pending or num_tokens != 1:
            return []
        room = min(
            budget - 1,
            request.max_tokens - len(request.output_token_ids) - 1,
            self.max_model_len - len(request.all_token_ids) - 1,
        )
        return request.spec_token_ids[: max(room, 0)]

    def _allocate_or_preempt(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """Allocate, preempting the policy's victims until it fits; False if `request` itself
        was preempted. A victim already scheduled this step is taken out of `out`."""
        while not self.kv.allocate_slots(request, num_tokens):
            victim = self.policy.pick_victim(self.running)
            self.running.remove(victim)
            out.scheduled = [s for s in out.scheduled if s.request is not victim]
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.prepend(request)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            fresh = request.num_computed_tokens == 0  # new or preempted: look in the cache
            hits = self.kv.get_computed_blocks(request) if fresh else []
            computed = len(hits) * self.kv.block_size if fresh else request.num_computed_tokens
            num_tokens = min(request.num_tokens - computed, budget)
            # KV from elsewhere, decoding on: its drafts (proposed on arrival) verify at once
            drafts = [] if fresh else self._drafts(request, num_tokens, budget, False)
            num_tokens += len(drafts)
            if not self.kv.allocate_slots(request, num_tokens, hits):
                break
            self.waiting.pop()
            if fresh:
                self.kv.stats.queries += request.num_tokens
                self.kv.stats.hits += computed
                request.num_computed_tokens = computed
            if request.times.first_scheduled is None:
                request.times.first_scheduled = time.time()
                request.num_cached_tokens = computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(self._scheduled(request, num_tokens, drafts))
            budget -= num_tokens

    def _append_accepted(
        self, request: Request, accepted: list[int], token: int
    ) -> EngineCoreOutput:
        """Append the drafts the target accepted, then its own token, each checked for a stop
        as if sampled alone (tokens after a stop are dropped). The accepted drafts' KV was
        computed by the verify pass; blocks past it (rejected drafts') go back."""
        new: list[int] = []
        out = None
        now = time.time()
        for i, tok in enumerate([*accepted, token]):
            grammar = request.grammar
            if grammar is not None and not grammar.advance(request.output_token_ids, tok):
                return self._end_refused(request, tok)
            request.output_token_ids.append(tok)
            request.all_token_ids.append(tok)
            if i < len(accepted):
                request.num_computed_tokens += 1
            new.append(tok)
            out = self._check_stop(request, tok)
            if out.finished:
                break
        assert out is not None
        request.times.last_token = now
        if not out.finished:
            self.kv.cache_blocks(request)
            self.kv.trim(request)
        out.new_token_ids = new
        return out

    def _end_refused(self, request: Request, token: int) -> EngineCoreOutput:
        """End a request whose grammar refused its sampled token: the grammar together with
        the request's other restrictions (min_tokens holding EOS back, allowed_token_ids) left
        no token to sample. Only this request ends; the step's others go on."""
        self.running.remove(request)
        self._free(request, RequestStatus.FINISHED_ABORTED)
        error = (
            "structured_outputs: the grammar allows no token here together with the request's "
            f"other restrictions (min_tokens, allowed_token_ids); token {token} was sampled"
        )
        return EngineCoreOutput(request.request_id, [], finish_reason="abort", error=error)

    def _check_stop(self, request: Request, token: int) -> EngineCoreOutput:
        """vLLM's order: length first, then (past min_tokens) eos, then stop_token_ids.
        `token` is the one just appended."""
        params = request.params
        status, stop_reason, by_token = None, None, False
        num_output = len(request.output_token_ids)
        if len(request.all_token_ids) >= self.max_model_len or num_output >= request.max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        elif num_output >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                status, by_token = RequestStatus.FINISHED_STOPPED, True
            elif params.stop_token_ids and token in params.stop_token_ids:
                status, stop_reason, by_token = RequestStatus.FINISHED_STOPPED, token, True
        if status is None and self._hand_offs and request.request_id in self._hand_offs:
            status = RequestStatus.HANDED_OFF  # decoding goes on in another engine
        if status is not None:
            self.running.remove(request)
            self._free(request, status)
            request.stop_reason = stop_reason
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[token],
            finish_reason=status.finish_reason if status else None,
            stop_reason=stop_reason,
            stopped_by_token=by_token,
            num_cached_tokens=request.num_cached_tokens,
            handed_off=status == RequestStatus.HANDED_OFF,
        )

    def _free(self, request: Request, status: RequestStatus) -> None:
        """Finish `request`; its blocks are freed now, or once the connector's save of them is
        done (`KVConnectorScheduler.request_finished` said so)."""
        rid = request.request_id
        request.status = status
        request.times.finished = time.time()
        del self.requests[rid]
        self._hand_offs.discard(rid)
        for listener in self.finish_listeners:
            listener(request)
        if self.connector is not None and self.connector.request_finished(
            request, self.kv.block_ids(rid)
        ):
            self._saving[rid] = request
            return
        self.kv.free(request)
