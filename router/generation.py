"""One API request, fanned out into its `n` completions and merged back into one stream.

`Generator.start(request)` returns a `Generation`; iterating it yields each completion's
`CompletionDelta`s as they come (the first token at once). The fan-out is `common.fan_out`'s,
the engine's own: completion i runs as worker request `request_id` (n = 1) or
`f"{i}_{request_id}"`, with seed + i when seeded. Leaving the iteration early (client gone)
cancels every completion, which aborts it on every worker involved.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from common.block_hash import request_extra_keys
from common.completion import CompletionTracker
from common.detokenizer import TokenTexts
from common.fan_out import FanOut
from proto.baton.v1 import worker_pb2
from proto.convert import params_to_proto
from router.backend import Backend
from router.completion import CompletionDelta, apply_chunk
from router.errors import NoWorkerError, RouterError
from router.metrics import RouterMetrics
from router.policies import RequestContext
from router.prefix_lookup import PrefixLookup
from router.preprocess import GenerationRequest
from router.registry import WorkerRegistry
from router.streams import merge_streams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


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
        self.fan_out = FanOut(
            request.request_id,
            request.params,
            lambda index, child: CompletionTracker(
                index, generator.tokenizer, child, request.prompt_token_ids
            ),
        )
        self.first_token_time: float | None = None
        self.num_cached_tokens: int | None = None  # completion 0's, from its first chunk
        self._context = generator.context(request)

    def __aiter__(self) -> AsyncGenerator[CompletionDelta, None]:
        return self._merge()

    @property
    def finished(self) -> bool:
        """Every completion has its finish reason."""
        return self.fan_out.finished

    def usage(self) -> Usage:
        """Token counts so far (final once iteration has ended)."""
        return Usage(
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=self.fan_out.num_output_tokens,
            cached_tokens=self.num_cached_tokens or 0,
        )

    async def _merge(self) -> AsyncGenerator[CompletionDelta, None]:
        metrics = self._generator.metrics
        metrics.request_arrived(len(self.request.prompt_token_ids))
        self._generator.num_inflight += 1
        merged = merge_streams([self._completion(child) for child in self.fan_out.completions])
        try:
            if self._generator.prefix_lookup is not None:  # one lookup for all n completions
                await self._generator.prefix_lookup.annotate(self._context)
            async with contextlib.aclosing(merged):
                async for _, delta in merged:
                    yield delta
        finally:
            self._generator.num_inflight -= 1
            e2e = time.time() - self.request.arrival_time if self.finished else None
            metrics.request_ended(self.first_token_time is not None, e2e)

    async def _completion(self, child_id: str) -> AsyncGenerator[CompletionDelta, None]:
        """One completion's deltas, from its worker request's token chunks."""
        tracker = self.fan_out.completions[child_id]
        request = self._generator.worker_request(self.request, child_id, tracker)
        ctx = replace(self._context, request_id=child_id)
        metrics = self._generator.metrics
        last_time: float | None = None
        chunks = self._backend.stream(request, ctx)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                now = time.time()
                if self.first_token_time is None and chunk.token_ids:
                    self.first_token_time = now
                    metrics.first_token(now - self.request.arrival_time)
                if tracker.index == 0 and self.num_cached_tokens is None:
                    self.num_cached_tokens = chunk.num_cached_tokens
                metrics.tokens(len(chunk.token_ids), None if last_time is None else now - last_time)
                last_time = now
                delta = apply_chunk(self.fan_out, child_id, chunk, self._generator.decode_token)
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
        self.decode_token = TokenTexts(tokenizer)  # one token's text on its own (logprobs)

    def start(self, request: GenerationRequest) -> Generation:
        """A Generation for `request` on the first backend with healthy workers (else 503)."""
        if self.draining:
            raise NoWorkerError("the router is shutting down")
        backend = next((b for b in self.backends if b.available()), None)
        if backend is None:
            raise NoWorkerError(self._unavailable_message())
        return Generation(self, request, backend)

    def worker_request(
        self, request: GenerationRequest, child_id: str, tracker: CompletionTracker
    ) -> worker_pb2.WorkerRequest:
        """Completion `child_id`'s request as a worker gets it (its own params, so n = 1; no
        stop strings: the router applies those)."""
        return worker_pb2.WorkerRequest(
            request_id=child_id,
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
