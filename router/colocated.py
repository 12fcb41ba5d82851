"""One request on a colocated worker (prefill and decode in one engine): `Generate`.

A worker that is full or unreachable before its first chunk is skipped for the next one; once
tokens flow the request stays where it is. Closing the stream early cancels the call and
aborts the request on the worker.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TypeAlias

import grpc

from proto.baton.v1 import common_pb2, worker_pb2
from router.aborts import AbortSender
from router.backend import Backend, choose_worker, is_retryable, is_unreachable
from router.config import Deadlines
from router.errors import NoWorkerError, RouterError, from_rpc_error
from router.policies import RequestContext, RoutingPolicy
from router.registry import WorkerRegistry
from router.workers import Role, WorkerInfo

Stream: TypeAlias = grpc.aio.UnaryStreamCall  # a Generate call in progress


class ColocatedBackend(Backend):
    """Generate on the policy's pick among healthy colocated workers."""

    def __init__(
        self,
        registry: WorkerRegistry,
        policy: RoutingPolicy,
        aborts: AbortSender,
        deadlines: Deadlines,
    ) -> None:
        self.registry = registry
        self.policy = policy
        self.aborts = aborts
        self.deadlines = deadlines

    def available(self) -> bool:
        return bool(self.registry.healthy(Role.COLOCATED))

    async def stream(
        self, request: worker_pb2.WorkerRequest, ctx: RequestContext
    ) -> AsyncGenerator[common_pb2.TokenChunk, None]:
        worker, call, first = await self._open(request, ctx)
        finished = bool(first.finish_reason)
        try:
            yield first
            while not finished:
                chunk = await self._read(worker, call)
                if chunk is None:
                    raise RouterError(f"generate on {worker.address} ended without finishing")
                finished = bool(chunk.finish_reason)
                yield chunk
        finally:
            call.cancel()
            if not finished:
                self.aborts.abort(worker, [request.request_id])

    async def _open(
        self, request: worker_pb2.WorkerRequest, ctx: RequestContext
    ) -> tuple[WorkerInfo, Stream, common_pb2.TokenChunk]:
        """Start Generate and read its first chunk, moving on when a worker is full or down."""
        tried: list[WorkerInfo] = []
        last_error: RouterError | None = None
        while True:
            try:
                worker = choose_worker(self.registry, self.policy, Role.COLOCATED, ctx, tried)
            except NoWorkerError:
                if last_error is None:
                    raise
                raise last_error from None
            tried.append(worker)
            call = worker.stub.Generate(request, timeout=self.deadlines.generate_s)
            try:
                first = await self._read(worker, call)
            except BaseException as error:
                call.cancel()
                self.aborts.abort(worker, [request.request_id])
                if not (isinstance(error, RouterError) and self._may_retry(worker, error)):
                    raise
                last_error = error
                continue
            if first is None:
                raise RouterError(f"generate on {worker.address} returned no token")
            return worker, call, first

    def _may_retry(self, worker: WorkerInfo, error: RouterError) -> bool:
        """Whether another worker may take the request after `worker` failed with `error`."""
        cause = error.__cause__
        if not isinstance(cause, grpc.RpcError) or not is_retryable(cause):
            return False
        if is_unreachable(cause):
            self.registry.mark_unhealthy(worker, error.message)
        return True

    @staticmethod
    async def _read(worker: WorkerInfo, call: Stream) -> common_pb2.TokenChunk | None:
        """The next chunk, None at the end of the stream; RouterError if the call failed."""
        try:
            chunk = await call.read()
        except grpc.RpcError as error:
            raise from_rpc_error(error, f"generate on {worker.address}") from error
        if chunk is grpc.aio.EOF:
            return None
        assert isinstance(chunk, common_pb2.TokenChunk)
        return chunk
