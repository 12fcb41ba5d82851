"""One API request, fanned out into its `n` completions and merged back into one stream.

`Generator.start(request)` returns a `Generation`; iterating it yields each completion's
`CompletionDelta`s as they come (the first token at once). Completion i runs as worker request
`request_id` (n = 1) or `f"{i}_{request_id}"` with seed + i when seeded, exactly as the
engine's `LLMEngine` fans out. Leaving the iteration early (client gone) cancels every
completion, which aborts it on every worker involved.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace

from transformers import PreTrainedTokenizerFast

from common.block_hash import request_extra_keys
from common.sampling_params import SamplingParams
from proto.baton.v1 import worker_pb2
from proto.convert import params_to_proto
from router.backend import Backend
from router.completion import CompletionDelta, CompletionTracker
from router.errors import NoWorkerError, RouterError
from router.metrics import RouterMetrics
from router.policies import RequestContext
from router.prefix_lookup import PrefixLookup
from router.preprocess import GenerationRequest
from router.registry import WorkerRegistry
from router.streams import merge_streams


@dataclass(slots=True)
class Usage:
    """Token counts of a request: prompt once, completions summed over the n, cached prompt
    tokens as the prefill / colocated worker found them in its prefix cache."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


class Generation:
    """A running request: `async for delta in generation`, then `usage()`."""

    def __init__(self, generator: Generator, request: GenerationRequest, backend: Backend) -> None:
        self.request = request
        self._generator = generator
        self._backend = backend
        params = request.params
        self.trackers = [
            CompletionTracker(
                i,
                generator.tokenizer,
                child_params(params, i),
                request.prompt_token_ids,
                generator.decode_token,
            )
            for i in range(params.n)
        ]
        self.first_token_time: float | None = None
        self._context = generator.context(request)

    def __aiter__(self) -> AsyncGenerator[CompletionDelta, None]:
        return self._merge()

    def usage(self) -> Usage:
        """Token counts so far (final once iteration has ended)."""
        return Usage(
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=sum(len(t.token_ids) for t in self.trackers),
            cached_tokens=self.trackers[0].num_cached_tokens or 0,
        )

    async def _merge(self) -> AsyncGenerator[CompletionDelta, None]:
        metrics = self._generator.metrics
        metrics.request_arrived(len(self.request.prompt_token_ids))
        self._generator.num_inflight += 1
        merged = merge_streams([self._completion(t) for t in self.trackers])
        try:
            if self._generator.prefix_lookup is not None:  # one lookup for all n completions
                await self._generator.prefix_lookup.annotate(self._context)
            async with contextlib.aclosing(merged):
                async for _, delta in merged:
                    yield delta
        finally:
            self._generator.num_inflight -= 1
            finished = all(t.finished for t in self.trackers)
            e2e = time.time() - self.request.arrival_time if finished else None
            metrics.request_ended(self.first_token_time is not None, e2e)

    async def _completion(
        self, tracker: CompletionTracker
    ) -> AsyncGenerator[CompletionDelta, None]:
        """One completion's deltas, from its worker request's token chunks."""
        request = self._generator.worker_request(self.request, tracker)
        ctx = replace(self._context, request_id=request.request_id)
        metrics = self._generator.metrics
        last_time: float | None = None
        chunks = self._backend.stream(request, ctx)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                now = time.time()
                if self.first_token_time is None and chunk.token_ids:
                    self.first_token_time = now
                    metrics.first_token(now - self.request.arrival_time)
                metrics.tokens(len(chunk.token_ids), None if last_time is None else now - last_time)
                last_time = now
                delta = tracker.add(chunk)
                if delta is not None:
                    yield delta
                if tracker.finished:
                    break  # a stop string: closing the stream aborts it on the workers
        if tracker.finish_reason is None:
            raise RouterError("a worker's stream ended without a finish reason")
        metrics.completion_finished(tracker.finish_reason)


class Generator:
    """Starts generations on the first available backend (disaggregated, then colocated)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        registry: WorkerRegistry,
        backends: list[Backend],
        metrics: RouterMetrics,
        served_model_name: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.registry = registry
        self.backends = backends
        self.metrics = metrics
        self.served_model_name = served_model_name
        self.num_inflight = 0  # requests being generated
        self.draining = False
        self.prefix_lookup: PrefixLookup | None = None  # None: route by load only
        self._token_text: dict[int, str] = {}

    def start(self, request: GenerationRequest) -> Generation:
        """A Generation for `request` on the first backend with healthy workers (else 503)."""
        if self.draining:
            raise NoWorkerError("the router is shutting down")
        backend = next((b for b in self.backends if b.available()), None)
        if backend is None:
            raise NoWorkerError(self._unavailable_message())
        return Generation(self, request, backend)

    def decode_token(self, token_id: int) -> str:
        """One token's text on its own (for logprobs), cached."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = str(self.tokenizer.decode([token_id]))
        return text

    def worker_request(
        self, request: GenerationRequest, tracker: CompletionTracker
    ) -> worker_pb2.WorkerRequest:
        """Completion `tracker.index`'s request as a worker gets it (n = 1, no stop strings:
        the router applies those)."""
        n = request.params.n
        request_id = request.request_id if n == 1 else f"{tracker.index}_{request.request_id}"
        return worker_pb2.WorkerRequest(
            request_id=request_id,
            prompt_token_ids=request.prompt_token_ids,
            params=params_to_proto(replace(tracker.params, stop=[])),
            priority=request.priority,
            tenant=request.tenant,
            cache_salt=request.cache_salt or "",
            arrival_time=request.arrival_time,
        )

    def context(self, request: GenerationRequest) -> RequestContext:
        """What routing policies see: the prompt and its block hashes (computed once)."""
        return RequestContext.build(
            request.request_id,
            request.prompt_token_ids,
            request_extra_keys(self.served_model_name, request.cache_salt),
            self.registry.block_size,
            request.priority,
            request.tenant,
        )

    def _unavailable_message(self) -> str:
        states = "; ".join(
            f"{w.role} {w.address}: {w.last_error or 'not polled yet'}"
            for w in self.registry.workers
        )
        return f"no healthy worker can serve the request ({states or 'none configured'})"


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """vLLM's fan-out (as `engine.llm_engine`): each child samples once; seeded ones get
    seed + index."""
    if params.n == 1:
        return params
    seed = None if params.seed is None else params.seed + index
    return replace(params, n=1, seed=seed)
