"""What both generation endpoints share: ids, client-disconnect handling, opening a stream so
that errors before the first token are still real HTTP statuses, and SSE framing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from router.errors import RouterError
from router.openai.errors import error_body, router_error_body
from router.openai.responses import DONE, sse
from router.openai.structured import name_constraint_field
from router.streams import prepend

T = TypeVar("T")
log = logging.getLogger(__name__)


def random_id(prefix: str) -> str:
    """An OpenAI-style id, e.g. `cmpl-3f2a...` (32 hex digits)."""
    return f"{prefix}-{uuid.uuid4().hex}"


async def unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it if the client disconnects first (vLLM's with_cancellation):
    a non-streamed request whose client left must not keep workers busy."""
    task = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    return Response(status_code=499)  # nobody is listening any more


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def open_stream(
    stream: AsyncGenerator[T, None], constraint_field: str | None = None
) -> AsyncGenerator[T, None]:
    """Wait for the first item of `stream` (so a failure before it raises here, to become an
    HTTP error), then return an iterator of all the items. A worker's complaint about the
    structured-outputs grammar is said of `constraint_field`, the field that set it."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        raise RouterError("the request produced no output") from None
    except RouterError as error:
        await stream.aclose()
        renamed = name_constraint_field(error, constraint_field)
        if renamed is error:
            raise
        raise renamed from error
    except BaseException:
        await stream.aclose()
        raise
    return prepend(first, stream)


def sse_response(events: AsyncGenerator[dict[str, Any], None]) -> StreamingResponse:
    """A `text/event-stream` of `data: {...}` events ending with `data: [DONE]`. An error
    after the stream started is sent as an event carrying OpenAI's error object."""
    return StreamingResponse(_frames(events), media_type="text/event-stream")


async def _frames(events: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[str]:
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield sse(event)
        except RouterError as error:
            yield sse(router_error_body(error))
        except Exception as error:  # a bug: still end the stream in the protocol's shape
            log.exception("stream failed")
            yield sse(error_body(f"internal error: {error!r}", "server_error"))
    yield DONE
