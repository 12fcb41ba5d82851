"""The router's errors: each kind knows its HTTP status, OpenAI error type and gRPC code.

Every failure a client can see is a `RouterError`; the HTTP layer renders it in OpenAI's error
shape, the gRPC layer aborts the call with its status code. Worker RPC failures are translated
by `from_rpc_error`.
"""

from __future__ import annotations

import re

import grpc

# A worker's complaint about a request field starts with the field's name, e.g.
# "structured_outputs.regex: the xgrammar backend cannot compile it: ...".
_FIELD_PREFIX = re.compile(r"^(structured_outputs(?:\.[a-z_]+)?)[: ]")


class RouterError(Exception):
    """A request failed in a way the client should hear about.

    `param` names the offending request field (OpenAI's `param`), when there is one; `code`
    (OpenAI's machine-readable `code`, e.g. "unknown_parameter") overrides the class's.
    """

    http_status = 500
    error_type = "server_error"
    code: str | None = None
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequestError(RouterError):
    """The request is malformed or out of range (HTTP 400, INVALID_ARGUMENT)."""

    http_status = 400
    error_type = "invalid_request_error"
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFoundError(RouterError):
    """The request names a model this router does not serve (HTTP 404, NOT_FOUND)."""

    http_status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"
    grpc_code = grpc.StatusCode.NOT_FOUND


class OverloadedError(RouterError):
    """Every suitable worker refused the request for lack of room (HTTP 429).

    `retry_after_s` (seconds) becomes the `Retry-After` header.
    """

    http_status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoWorkerError(RouterError):
    """No healthy worker can serve the request, or the router is draining (HTTP 503)."""

    http_status = 503
    error_type = "service_unavailable_error"
    code = "service_unavailable"
    grpc_code = grpc.StatusCode.UNAVAILABLE


class WorkerTimeoutError(RouterError):
    """A worker did not answer within its deadline (HTTP 504, DEADLINE_EXCEEDED)."""

    http_status = 504
    error_type = "timeout_error"
    code = "timeout"
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


def from_rpc_error(error: grpc.RpcError, what: str) -> RouterError:
    """Translate a worker's failed RPC (`what` names it, e.g. "prefill on host:port")."""
    code, details = rpc_status(error)
    message = f"{what} failed: {details or code}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        named = _FIELD_PREFIX.match(details or "")
        return InvalidRequestError(details or message, named.group(1) if named else None)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = f"{what}: worker overloaded: {details or 'no room'}"
        return OverloadedError(message, retry_after_s(error))
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return WorkerTimeoutError(f"{what}: no answer within the deadline")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return NoWorkerError(message)
    return RouterError(message)


def rpc_status(error: grpc.RpcError) -> tuple[grpc.StatusCode | None, str | None]:
    """The status code and details of a failed RPC (None, None if it carries neither)."""
    code_fn, details_fn = getattr(error, "code", None), getattr(error, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    return code, details


def retry_after_s(error: grpc.RpcError, default: float = 1.0) -> float:
    """The `retry-after` trailing metadata (seconds) a worker sent with RESOURCE_EXHAUSTED."""
    metadata_fn = getattr(error, "trailing_metadata", None)
    metadata = metadata_fn() if callable(metadata_fn) else None
    for key, value in metadata or ():
        if key == "retry-after":
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                break
    return default
