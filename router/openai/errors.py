"""Errors in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.

FastAPI's own failures are folded in: a body that is not JSON or fails validation is a 400
naming the field (not FastAPI's 422), an unknown path a 404, a wrong method a 405. A bug is a
500 in the same shape that leaves the connection open (see `CatchAll`).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from router.errors import OverloadedError, RouterError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def router_error_body(error: RouterError) -> dict[str, Any]:
    """A RouterError as OpenAI's error object."""
    return error_body(error.message, error.error_type, error.param, error.code)


def router_error_response(error: RouterError) -> JSONResponse:
    """A RouterError as an HTTP response (with Retry-After, in whole seconds, for a 429)."""
    headers = {}
    if isinstance(error, OverloadedError):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return JSONResponse(router_error_body(error), status_code=error.http_status, headers=headers)


def validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    """A readable message for the first validation problem, and the field it names."""
    errors = error.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {detail}".rstrip(": "), None
    loc = _loc(first)
    if first.get("type") == "extra_forbidden":
        param = ".".join(loc)
        return f"unknown field {param!r}", param
    if not loc:
        return "the request body must be a JSON object (Content-Type: application/json)", None
    # A union reports each branch it tried (e.g. prompt.str, prompt.list[int]): name them all.
    path = loc[: next((i for i, p in enumerate(loc) if _is_type_name(p)), len(loc))]
    param = ".".join(path)
    branches = [
        e_loc[len(path)]
        for e_loc in map(_loc, errors)
        if len(e_loc) > len(path) and e_loc[: len(path)] == path and _is_type_name(e_loc[len(path)])
    ]
    if branches:
        return f"{param}: expected one of {', '.join(dict.fromkeys(branches))}", param
    return f"{param}: {first.get('msg', 'invalid value')}", param


def _loc(error: Any) -> list[str]:
    return [str(part) for part in error.get("loc", ()) if part != "body"]


def _is_type_name(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]"} or (
        part.startswith(("list[", "dict[", "function-"))
    )


class CatchAll:
    """ASGI middleware: an unexpected exception before the response started becomes OpenAI's
    500 body, and stops there. (Starlette's own last-resort handler answers, then re-raises,
    and uvicorn then closes the connection: the client's next request on that keep-alive
    connection is reset.) `on_error(500)` is told of each."""

    def __init__(self, app: ASGIApp, on_error: Any = None) -> None:
        self.app = app
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_and_note(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as error:
            if started:
                raise  # half a response: closing the connection is all that is left
            log.exception("unexpected error")
            if self.on_error is not None:
                self.on_error(500)
            body = error_body(f"internal error: {error!r}", "server_error")
            await JSONResponse(body, status_code=500)(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is OpenAI's 413. A declared
    Content-Length is checked before anything reads the body; a body sent without one is
    counted as it is read, and its 413 goes through the app's HTTPException handler.
    `on_error(413)` is told of the first kind (the handler reports the second)."""

    def __init__(self, app: ASGIApp, max_bytes: int, on_error: Any = None) -> None:
        self.app, self.max_bytes, self.on_error = app, max_bytes, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = HTTPException(413, f"the request body is over {self.max_bytes} bytes")
        if _content_length(scope) > self.max_bytes:
            if self.on_error is not None:
                self.on_error(413)
            body = error_body(str(too_large.detail), "invalid_request_error")
            await JSONResponse(body, 413)(scope, receive, send)
            return
        read = 0

        async def counted() -> Message:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def install_error_handlers(
    app: FastAPI, on_error: Any = None, max_body_bytes: int | None = None
) -> None:
    """Render every error in OpenAI's shape; `on_error(status)` is told each one's status.
    Bodies over `max_body_bytes` (None: no limit) are 413s."""

    def report(status: int) -> None:
        if on_error is not None:
            on_error(status)

    @app.exception_handler(RouterError)
    async def _router_error(_: Request, error: RouterError) -> JSONResponse:
        report(error.http_status)
        return router_error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        report(400)
        message, param = validation_message(error)
        code = "unknown_parameter" if message.startswith("unknown field") else "invalid_value"
        body = error_body(message, "invalid_request_error", param, code)
        return JSONResponse(body, status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
        report(error.status_code)
        message = _body_error_message(error) or str(error.detail)
        body = error_body(message, _TYPES.get(error.status_code, "server_error"))
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    app.add_middleware(CatchAll, on_error=on_error)
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes, on_error=on_error)


def _body_error_message(error: HTTPException) -> str | None:
    """What FastAPI's "There was an error parsing the body" (a 400) was about."""
    cause = error.__cause__
    if error.status_code != 400 or cause is None:
        return None
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8: {cause.reason} at byte {cause.start}"
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON: nested too deeply"
    return f"the request body is not valid JSON: {str(cause).split(':')[0]}"
