"""One request through a prefill/decode pair.

::

    router --Reserve(request, lease)--> D        D holds blocks for the prompt's KV
    router --Prefill(request, target)--> P       P computes the prompt, pushes KV into D,
           <------- first token --------          answers with the first token
    router --Decode(request_id, first)--> D      D streams the tokens after the first
           <====== token chunks ========

When no decode worker holds a prefix of the prompt (per the prefix index), the Reserve runs
while P already computes: Prefill(target_follows) goes first, Reserve(fresh_blocks) beside it,
then SetTarget(target) to P, so the reservation's round trip leaves the time to first token.

Reserve goes to the next decode worker when one is full or unreachable. A Prefill that fails
with UNAVAILABLE (KV transfer failed) or RESOURCE_EXHAUSTED is tried once more on another
prefill worker; the reservation stays valid meanwhile. Whatever ends the request early (a
first token that already finishes it, a stop string, a cancelled client, an error) aborts the
reservation / request on D, and an interrupted Prefill is aborted on P.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

import grpc

from proto.baton.v1 import common_pb2, worker_pb2
from router.aborts import AbortSender
from router.backend import Backend, choose_worker, is_retryable, is_unreachable
from router.config import Deadlines
from router.errors import NoWorkerError, RouterError, from_rpc_error
from router.metrics import RouterMetrics
from router.policies import RequestContext, RoutingPolicy
from router.registry import WorkerRegistry
from router.workers import Role, WorkerInfo

log = logging.getLogger(__name__)

PREFILL_ATTEMPTS = 2  # the first try and one retry on another prefill worker


class DisaggregatedBackend(Backend):
    """Reserve on D, Prefill on P, Decode on D. `lease_s`: seconds D holds the reservation."""

    def __init__(
        self,
        registry: WorkerRegistry,
        policy: RoutingPolicy,
        aborts: AbortSender,
        deadlines: Deadlines,
        lease_s: float = 30.0,
        local_prefill_threshold: int = 0,
        metrics: RouterMetrics | None = None,
        overlap_reserve: bool = True,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.aborts = aborts
        self.deadlines = deadlines
        self.lease_s = lease_s
        self.local_prefill_threshold = local_prefill_threshold
        self.metrics = metrics
        self.overlap_reserve = overlap_reserve

    def available(self) -> bool:
        return bool(self.registry.healthy(Role.PREFILL) and self.registry.healthy(Role.DECODE))

    async def stream(
        self, request: worker_pb2.WorkerRequest, ctx: RequestContext
    ) -> AsyncGenerator[common_pb2.TokenChunk, None]:
        local = self._local_prefill_worker(ctx)
        if local is not None:
            async for chunk in self._generate_locally(local, request):
                yield chunk
            return
        decode: WorkerInfo | None = None
        finished_on_decode = False
        try:
            if self.overlap_reserve and not any(
                ctx.cached_tokens(w) for w in self.registry.healthy(Role.DECODE)
            ):
                decode, first = await self._reserve_while_prefilling(request, ctx)
            else:
                decode, target = await self._reserve(request, ctx)
                first = await self._prefill(request, target, ctx)
            yield first
            if first.finish_reason:
                return  # the first token ended it: the reservation is aborted below
            async for chunk in self._decode(decode, request.request_id, first.token_ids[0]):
                finished_on_decode = bool(chunk.finish_reason)
                yield chunk
        finally:
            if decode is not None and not finished_on_decode:
                self.aborts.abort(decode, [request.request_id])

    def _local_prefill_worker(self, ctx: RequestContext) -> WorkerInfo | None:
        """Conditional disaggregation: the decode worker the policy picks, if it already holds
        all but at most `local_prefill_threshold` prompt tokens (and some of them)."""
        if self.local_prefill_threshold <= 0 or not ctx.prefix_matches:
            return None
        candidates = self.registry.healthy(Role.DECODE)
        if not candidates:
            return None
        worker = self.policy.choose(candidates, ctx)
        cached = ctx.cached_tokens(worker)
        if cached == 0 or len(ctx.prompt_token_ids) - cached > self.local_prefill_threshold:
            return None
        worker.assigned_since_poll += 1
        self.policy.decided(worker, ctx)
        if self.metrics is not None:
            self.metrics.local_prefills.labels(self.metrics.model_name).inc()
        return worker

    async def _generate_locally(
        self, worker: WorkerInfo, request: worker_pb2.WorkerRequest
    ) -> AsyncGenerator[common_pb2.TokenChunk, None]:
        """The whole request on one decode worker (no KV moves); closing it aborts there."""
        call = worker.stub.Generate(request, timeout=self.deadlines.generate_s)
        finished = False
        try:
            async for chunk in call:
                finished = bool(chunk.finish_reason)
                yield chunk
        except grpc.RpcError as error:
            raise from_rpc_error(
                error, f"local prefill on decode worker {worker.address}"
            ) from error
        finally:
            call.cancel()
            if not finished:
                self.aborts.abort(worker, [request.request_id])

    async def _reserve_while_prefilling(
        self, request: worker_pb2.WorkerRequest, ctx: RequestContext
    ) -> tuple[WorkerInfo, common_pb2.TokenChunk]:
        """Start the prefill first and reserve on D meanwhile, so the reservation's round trip
        is not in the time to first token: P gets its target by SetTarget (used when no decode
        worker holds a prefix of the prompt: the reservation takes fresh blocks, P sends all).
        A failed prefill is retried once on another prefill worker, with the whole target."""
        rid = request.request_id
        worker = choose_worker(self.registry, self.policy, Role.PREFILL, ctx, [])
        message = worker_pb2.PrefillRequest(request=request, target_follows=True)
        prefill = asyncio.ensure_future(self._call_prefill(worker, message))
        prefill.add_done_callback(lambda t: t.cancelled() or t.exception())
        try:
            decode, target = await self._reserve(request, ctx, fresh_blocks=True)
        except BaseException:
            prefill.cancel()  # aborts it on P
            raise
        try:
            try:
                update = worker_pb2.PrefillTarget(request_id=rid, target=target)
                await worker.stub.SetTarget(update, timeout=self.deadlines.reserve_s)
                response = await prefill
            except grpc.RpcError as error:
                if prefill.done() and not prefill.cancelled():
                    error = prefill.exception() or error  # P failed first: say why
                prefill.cancel()
                failure = from_rpc_error(error, f"prefill on {worker.address}")
                others = [w for w in self.registry.healthy(Role.PREFILL) if w is not worker]
                if not (is_retryable(error) and others):
                    raise failure from error
                log.warning("%s; retrying on another prefill worker", failure.message)
                return decode, await self._prefill(request, target, ctx, tried=[worker])
            if not response.first.token_ids:
                raise RouterError(f"prefill on {worker.address} returned no token")
            return decode, response.first
        except BaseException:
            prefill.cancel()
            self.aborts.abort(decode, [rid])
            raise

    async def _reserve(
        self, request: worker_pb2.WorkerRequest, ctx: RequestContext, fresh_blocks: bool = False
    ) -> tuple[WorkerInfo, worker_pb2.KVTransferTarget]:
        """Reserve blocks on a decode worker, trying the next one when one is full or down."""
        tried: list[WorkerInfo] = []
        last_error: RouterError | None = None
        message = worker_pb2.ReserveRequest(
            request=request, lease_seconds=self.lease_s, fresh_blocks=fresh_blocks
        )
        while True:
            try:
                worker = choose_worker(self.registry, self.policy, Role.DECODE, ctx, tried)
            except NoWorkerError:
                if last_error is None:
                    raise
                raise last_error from None  # every decode worker refused: say why
            tried.append(worker)
            try:
                reservation = await self._call_reserve(worker, message)
                return worker, reservation.target
            except grpc.RpcError as error:
                last_error = from_rpc_error(error, f"reserve on decode worker {worker.address}")
                if is_unreachable(error):
                    self.registry.mark_unhealthy(worker, last_error.message)
                if not is_retryable(error):
                    raise last_error from error

    async def _call_reserve(
        self, worker: WorkerInfo, message: worker_pb2.ReserveRequest
    ) -> worker_pb2.Reservation:
        # A cancelled call may still have made the reservation on D: abort it there.
        call = worker.stub.Reserve(message, timeout=self.deadlines.reserve_s)
        reservation: worker_pb2.Reservation = await self._abort_if_cancelled(
            worker, message.request.request_id, call
        )
        return reservation

    async def _prefill(
        self,
        request: worker_pb2.WorkerRequest,
        target: worker_pb2.KVTransferTarget,
        ctx: RequestContext,
        tried: list[WorkerInfo] | None = None,
    ) -> common_pb2.TokenChunk:
        """The first token from a prefill worker (one retry on another after a failure;
        `tried`: workers that already failed it)."""
        message = worker_pb2.PrefillRequest(request=request, target=target)
        tried = list(tried or [])
        while True:
            worker = choose_worker(self.registry, self.policy, Role.PREFILL, ctx, tried)
            tried.append(worker)
            try:
                response = await self._call_prefill(worker, message)
            except grpc.RpcError as error:
                failure = from_rpc_error(error, f"prefill on {worker.address}")
                if len(tried) < PREFILL_ATTEMPTS and is_retryable(error):
                    others = [w for w in self.registry.healthy(Role.PREFILL) if w not in tried]
                    if others:
                        log.warning("%s; retrying on another prefill worker", failure.message)
                        continue
                raise failure from error
            if not response.first.token_ids:
                raise RouterError(f"prefill on {worker.address} returned no token")
            return response.first

    async def _call_prefill(
        self, worker: WorkerInfo, message: worker_pb2.PrefillRequest
    ) -> worker_pb2.PrefillResponse:
        call = worker.stub.Prefill(message, timeout=self.deadlines.prefill_s)
        response: worker_pb2.PrefillResponse = await self._abort_if_cancelled(
            worker, message.request.request_id, call
        )
        return response

    async def _abort_if_cancelled(self, worker: WorkerInfo, request_id: str, call: Any) -> Any:
        """Await a unary call; if this request is cancelled meanwhile, abort it on `worker`."""
        try:
            return await call
        except asyncio.CancelledError:
            self.aborts.abort(worker, [request_id])
            raise

    async def _decode(
        self, worker: WorkerInfo, request_id: str, first_token_id: int
    ) -> AsyncGenerator[common_pb2.TokenChunk, None]:
        """The decode worker's chunks; cancelling the call aborts the request there."""
        call = worker.stub.Decode(
            worker_pb2.DecodeRequest(request_id=request_id, first_token_id=first_token_id),
            timeout=self.deadlines.decode_s,
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.RpcError as error:
            raise from_rpc_error(error, f"decode on {worker.address}") from error
        finally:
            call.cancel()
