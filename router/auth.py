"""The API key (`--api-key`): `Authorization: Bearer KEY` on the HTTP API's /v1/* paths and on
the gRPC Router service, compared in constant time.

As vLLM's --api-key, only /v1 is guarded: /health, /metrics, /version, /tokenize and
/detokenize stay open, and so do gRPC health checks, reflection and the prefix-index service
the workers publish KV events to (it sees no prompts and serves no generation).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

import grpc
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from router.openai.errors import error_body

UNAUTHORIZED = 401
MISSING = "missing API key: send `Authorization: Bearer YOUR_KEY`"
INCORRECT = "incorrect API key"


def bearer_matches(authorization: bytes | None, api_key: str) -> bool:
    """True if an Authorization value is `Bearer <api_key>` (constant time in the key)."""
    return hmac.compare_digest(authorization or b"", b"Bearer " + api_key.encode())


def rejection(authorization: bytes | None, api_key: str) -> str | None:
    """Why a request with this Authorization value is refused, or None if it may pass."""
    if authorization is None:
        return MISSING
    return None if bearer_matches(authorization, api_key) else INCORRECT


class APIKeyMiddleware:
    """ASGI middleware: a 401 in OpenAI's error shape for /v1/* without the right key;
    `on_reject(401)` is told each refusal (the router's failure counter)."""

    def __init__(
        self, app: ASGIApp, api_key: str, on_reject: Callable[[int], None] | None = None
    ) -> None:
        self.app, self.api_key, self.on_reject = app, api_key, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _guarded(scope["path"]):
            headers = dict(scope["headers"])  # lower-case names; the first of a repeated one
            reason = rejection(headers.get(b"authorization"), self.api_key)
            if reason is not None:
                if self.on_reject is not None:
                    self.on_reject(UNAUTHORIZED)
                body = error_body(reason, "invalid_request_error", None, "invalid_api_key")
                response = JSONResponse(body, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _guarded(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class APIKeyInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for calls to the named gRPC services (full names, e.g.
    `baton.v1.Router`) without metadata `authorization: Bearer KEY`; other services pass."""

    def __init__(
        self,
        api_key: str,
        services: Collection[str],
        on_reject: Callable[[int], None] | None = None,
    ) -> None:
        self.api_key, self.on_reject = api_key, on_reject
        self._prefixes = tuple(f"/{name}/" for name in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self._prefixes):
            return handler
        metadata: Iterable[tuple[str, Any]] = handler_call_details.invocation_metadata or ()
        value = next((v for k, v in metadata if k == "authorization"), None)
        reason = rejection(value.encode() if isinstance(value, str) else value, self.api_key)
        if reason is None:
            return handler
        if self.on_reject is not None:
            self.on_reject(UNAUTHORIZED)
        return _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts the call with UNAUTHENTICATED."""

    async def refuse(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kind = "_".join("stream" if s else "unary" for s in (handler.request_streaming,
                                                         handler.response_streaming))  # fmt: skip
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(  # type: ignore[no-any-return]
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
