"""A router running in a background thread (its own event loop), for tests and embedding.

    config = RouterConfig(model=DIR, colocated=[addr], port=0, grpc_port=0)
    with RouterThread(config) as r:
        httpx.get(f"{r.base_url}/health")

Port 0 (HTTP or gRPC) picks a free port; `base_url` and `grpc_address` tell which.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import replace
from types import TracebackType
from typing import Any, TypeVar

from router.config import RouterConfig
from router.server import RouterServer

T = TypeVar("T")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports nobody listens on right now."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]


class RouterThread:
    """Starts a router on enter (blocking until it serves), drains it on exit."""

    def __init__(self, config: RouterConfig, start_timeout_s: float = 30.0) -> None:
        http_port, grpc_port = free_ports(2, config.host)
        self.config = replace(
            config, port=config.port or http_port, grpc_port=config.grpc_port or grpc_port
        )
        self.start_timeout_s = start_timeout_s
        self.server: RouterServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="router", daemon=True)

    @property
    def base_url(self) -> str:
        """The HTTP root, e.g. http://127.0.0.1:8000."""
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC front."""
        return f"{self.config.host}:{self.config.grpc_port}"

    def __enter__(self) -> RouterThread:
        self._thread.start()
        if not self._started.wait(self.start_timeout_s):
            raise TimeoutError("the router did not start")
        if self._error is not None:
            raise RuntimeError("the router failed to start") from self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Drain and stop the router; wait for its thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=self.config.drain_grace_s + 10)

    def call(self, coro_fn: Callable[[], Coroutine[Any, Any, T]], timeout_s: float = 30.0) -> T:
        """Run `coro_fn()` on the router's loop and return its result (e.g. a registry poll)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout_s)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = await RouterServer.start(self.config)
        except BaseException as error:
            self._error = error
            self._started.set()
            raise
        serving = asyncio.create_task(self.server.serve(self._stop))
        while not self.server.http.started and not serving.done():
            await asyncio.sleep(0.01)
        self._started.set()
        await serving
