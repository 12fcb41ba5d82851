"""Engine errors as gRPC statuses: the same mapping in every worker service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from engine.errors import EngineOverloadedError
from kv_transfer.base import KVTransferError

T = TypeVar("T")


async def abort_with_status(context: grpc.aio.ServicerContext, error: Exception) -> None:
    """Abort the RPC with the status that fits `error` (re-raises anything unexpected)."""
    if isinstance(error, ValueError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, EngineOverloadedError):
        context.set_trailing_metadata((("retry-after", str(error.retry_after_s)),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, KVTransferError):
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {error}")
    if isinstance(error, KeyError):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(error.args[0]) if error.args else "")
    raise error


async def unary(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    """Run a unary handler, mapping engine errors to statuses."""
    try:
        return await call()
    except (ValueError, EngineOverloadedError, KVTransferError, KeyError) as e:
        await abort_with_status(context, e)
        raise  # unreachable: abort raises


async def streaming(
    context: grpc.aio.ServicerContext, stream: Callable[[], AsyncIterator[Any]]
) -> AsyncIterator[Any]:
    """Run a server-streaming handler, mapping engine errors to statuses."""
    try:
        async for item in stream():
            yield item
    except (ValueError, EngineOverloadedError, KVTransferError, KeyError) as e:
        await abort_with_status(context, e)
