"""`AsyncEngineCore`: an `EngineCore` on its own thread, driven from asyncio.

The core is not thread-safe, so one thread owns it: it runs the commands that callers submit
(`call`: add, abort, a KV connector's reserve, ...) between steps, steps while there is work,
and hands each step's outputs to the asyncio queue of the request they belong to. Callers on
other threads reach the core only through commands; `config` and `load` are safe to read. The
worker services (prefill, decode, colocated) are thin gRPC layers over this.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.core import EngineCore
from engine.outputs import EngineCoreOutput
from engine.request import Request

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class LoadSnapshot:
    """The engine's load after its latest step (read without locking)."""

    num_waiting: int = 0
    num_running: int = 0
    num_reserved: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_usage: float = 0.0  # fraction of blocks in use
    prefix_cache_queries: int = 0  # tokens
    prefix_cache_hits: int = 0  # tokens
    num_preemptions: int = 0
    num_prompt_tokens_waiting: int = 0  # tokens queued to prefill (the autoscaler's signal)
    num_batched_tokens: int = 0  # tokens of the latest step
    steps: int = 0


class AsyncEngineCore:
    """Thread-owned engine core with an asyncio API; `start()` before use, `shutdown()` after."""

    def __init__(self, core: EngineCore, idle_wait_s: float = 0.05) -> None:
        self.core = core  # the engine thread's: reach it by `call`
        self.config = core.config  # never changes
        self.load = LoadSnapshot()
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self.on_step: Callable[[list[EngineCoreOutput], float], None] | None = None  # metrics
        self._refresh_load()

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    async def call(self, fn: Callable[[EngineCore], T]) -> T:
        """Run `fn(core)` on the engine thread between steps; its result or exception."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def command() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.core))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    future.set_exception(e)

        self._commands.put(command)
        return await asyncio.wrap_future(future)

    def generate(self, request: Request) -> AsyncIterator[EngineCoreOutput]:
        """Add `request` and yield its outputs until it is done here. Leaving the loop early
        (client gone, task cancelled) aborts the request and frees its blocks."""
        return self.stream(request.request_id, lambda core: core.add_request(request))

    async def stream(
        self, request_id: str, start: Callable[[EngineCore], object]
    ) -> AsyncIterator[EngineCoreOutput]:
        """Yield `request_id`'s outputs until it is done here, once `start(core)` ran on the
        engine thread: the command that makes it produce them (add it; or, for a request that
        waits for KV from elsewhere, report its KV arrived to the KV connector). Leaving the
        loop early aborts the request."""
        outputs = self._open_stream(request_id)
        try:
            await self.call(start)
            async for out in self._read(outputs):
                yield out
        finally:
            await self._close_stream(request_id)

    def _done_streaming(self, request_id: str) -> None:
        """The request ended in the engine (its last output said so): nothing to abort."""
        self._streams.pop(request_id, None)

    async def abort(self, request_ids: list[str]) -> int:
        """Abort requests (queued, running or reserved); returns how many existed."""
        aborted = await self.call(lambda core: core.abort_requests(request_ids))
        for request_id in request_ids:
            self._deliver(request_id, None)
        return len(aborted)

    def _open_stream(self, request_id: str) -> asyncio.Queue:
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already streaming")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        return outputs

    async def _read(self, outputs: asyncio.Queue) -> AsyncIterator[EngineCoreOutput]:
        while True:
            out = await outputs.get()
            if out is None:  # aborted
                return
            if out.done_here:  # the engine let it go: closing needs no round trip to it
                self._done_streaming(out.request_id)
            yield out
            if out.done_here:
                return

    async def _close_stream(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            await asyncio.shield(self.call(lambda core: core.abort_requests([request_id])))

    def _deliver(self, request_id: str, out: EngineCoreOutput | None) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, outputs = target
            loop.call_soon_threadsafe(outputs.put_nowait, out)

    # --- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._run_commands(block=not self.core.has_work()):
                self._refresh_load()
            if self.core.has_work():
                self._step()

    def _run_commands(self, block: bool) -> int:
        """Run queued commands (waiting a little for one when idle); how many ran."""
        ran = 0
        try:
            command = self._commands.get(timeout=self._idle_wait_s) if block else None
            while True:
                if command is not None:
                    command()
                    ran += 1
                command = self._commands.get_nowait()
        except queue.Empty:
            return ran

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            outputs = self.core.step()
        except Exception:  # a broken step must not kill the worker silently
            log.exception("engine step failed; aborting its requests")
            self._fail_all()
            return
        for out in outputs:
            self._deliver(out.request_id, out)
        self._refresh_load()
        if self.on_step is not None:
            self.on_step(outputs, time.perf_counter() - start)

    def _fail_all(self) -> None:
        ids = list(self.core.scheduler.requests)
        self.core.abort_requests(ids)
        for request_id in ids:
            self._deliver(request_id, None)

    def _refresh_load(self) -> None:
        core, kv = self.core, self.core.kv
        self.load = LoadSnapshot(
            num_waiting=core.scheduler.num_waiting(),
            num_running=core.scheduler.num_running(),
            num_reserved=core.scheduler.num_waiting_for_kv(),
            num_free_blocks=kv.num_free_blocks(),
            num_total_blocks=kv.pool.num_blocks,
            kv_usage=kv.usage(),
            prefix_cache_queries=kv.stats.queries,
            prefix_cache_hits=kv.stats.hits,
            num_preemptions=core.scheduler.num_preemptions,
            num_prompt_tokens_waiting=core.scheduler.num_prompt_tokens_waiting(),
            num_batched_tokens=core.scheduler.num_batched_tokens,
            steps=self.core.scheduler.num_steps,
        )

    def snapshot(self) -> dict[str, Any]:
        return {name: getattr(self.load, name) for name in LoadSnapshot.__slots__}
