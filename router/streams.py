"""Merging async streams: items of several iterators as they come, tagged by source."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_END = object()


@dataclass(slots=True)
class _Failure:
    error: BaseException


async def merge_streams(
    streams: Sequence[AsyncGenerator[T, None]],
) -> AsyncGenerator[tuple[int, T], None]:
    """Yield `(i, item)` for each item of `streams[i]`, in arrival order, until all end.

    The first stream to raise ends the merge with its exception. Leaving early (or being
    cancelled) cancels every stream still running, which closes it (its `finally` runs).
    """
    if len(streams) == 1:
        # One stream (the usual request): pull it in place, so an item is handed on before the
        # next one is even asked for (which may start an RPC: the decode after a prefill's
        # first token), with no task or queue in between.
        async with contextlib.aclosing(streams[0]) as only:
            async for value in only:
                yield 0, value
        return
    queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    queue.put_nowait((i, item))
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # handed to the consumer
            queue.put_nowait((i, _Failure(error)))
        else:
            queue.put_nowait((i, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, _Failure):
                raise item.error
            else:
                yield i, item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()


async def prepend(first: T, rest: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
    """`first`, then the items of `rest` (closed when this iterator is)."""
    async with contextlib.aclosing(rest):
        yield first
        async for item in rest:
            yield item
