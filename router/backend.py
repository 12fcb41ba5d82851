"""The one interface behind which a worker request is served: token chunks, first included.

Two implementations: `DisaggregatedBackend` (Reserve on a decode worker, Prefill on a prefill
worker, then Decode) and `ColocatedBackend` (Generate on one worker). Closing a stream early
(stop string, client gone, error) aborts the request on every worker involved.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Sequence

import grpc

from proto.baton.v1 import common_pb2, worker_pb2
from router.errors import NoWorkerError, rpc_status
from router.policies import RequestContext, RoutingPolicy
from router.registry import WorkerRegistry
from router.workers import Role, WorkerInfo

# Codes after which the same request may be tried on another worker of the role.
RETRYABLE_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class Backend(ABC):
    """Serves one worker request (n = 1) as a stream of `TokenChunk`s."""

    @abstractmethod
    def available(self) -> bool:
        """True when enough healthy workers exist to serve a request this way."""

    @abstractmethod
    def stream(
        self, request: worker_pb2.WorkerRequest, ctx: RequestContext
    ) -> AsyncGenerator[common_pb2.TokenChunk, None]:
        """Every generated token, first included; the last chunk has `finish_reason` set.

        Raises RouterError. Closing the iterator early aborts the request on the workers.
        """


def choose_worker(
    registry: WorkerRegistry,
    policy: RoutingPolicy,
    role: Role,
    ctx: RequestContext,
    exclude: Sequence[WorkerInfo] = (),
) -> WorkerInfo:
    """The policy's pick among healthy `role` workers not in `exclude` (NoWorkerError if none)."""
    candidates = [w for w in registry.healthy(role) if w not in exclude]
    if not candidates:
        raise NoWorkerError(_no_worker_message(registry, role, bool(exclude)))
    worker = policy.choose(candidates, ctx)
    worker.assigned_since_poll += 1
    policy.decided(worker, ctx)
    if ctx.on_routed is not None:
        ctx.on_routed(worker, ctx)
    return worker


def _no_worker_message(registry: WorkerRegistry, role: Role, after_failures: bool) -> str:
    configured = registry.configured(role)
    if after_failures:
        return f"no other healthy {role} worker to try"
    if not configured:
        return f"no {role} worker is configured"
    states = "; ".join(f"{w.address}: {w.last_error or 'not polled yet'}" for w in configured)
    return f"no healthy {role} worker ({states})"


def is_retryable(error: grpc.RpcError) -> bool:
    """Whether another worker of the same role might succeed where this RPC failed."""
    return rpc_status(error)[0] in RETRYABLE_CODES


def is_unreachable(error: grpc.RpcError) -> bool:
    """Whether the RPC failed because the worker could not be reached."""
    return rpc_status(error)[0] == grpc.StatusCode.UNAVAILABLE
