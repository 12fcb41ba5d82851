"""HTTP (uvicorn) and gRPC (grpc.aio) fronts in one asyncio process, with graceful drain.

On SIGTERM or SIGINT the router stops taking requests (health says NOT_SERVING / 503, new
requests get 503), lets in-flight ones finish for up to `drain_grace_s` seconds, then exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import uvicorn
from grpc_health.v1 import health

from router.admin import add_admin_routes
from router.config import RouterConfig
from router.grpc_service import build_grpc_server, set_serving
from router.openai.app import build_app
from router.services import RouterServices

log = logging.getLogger(__name__)


class _HTTPServer(uvicorn.Server):
    """uvicorn without its own signal handling: the router drains both fronts itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(eq=False)
class RouterServer:
    """A running router: its services, HTTP server and gRPC server (None if grpc_port is 0)."""

    config: RouterConfig
    services: RouterServices
    http: uvicorn.Server
    grpc_server: grpc.aio.Server | None
    grpc_health: health.aio.HealthServicer | None
    grpc_port: int = 0

    @classmethod
    async def start(cls, config: RouterConfig) -> RouterServer:
        """Load the tokenizer, poll the workers once, open both ports."""
        services = RouterServices.build(config)
        await services.start()
        app = build_app(services)
        if services.membership is not None:
            add_admin_routes(app, services.membership, config.api_key)
        uv_config = uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            lifespan="off",
            timeout_graceful_shutdown=int(config.drain_grace_s),
            log_level="warning",
        )
        http = _HTTPServer(uv_config)
        grpc_server, grpc_health, grpc_port = None, None, 0
        if config.grpc_port:
            address = f"{config.host}:{config.grpc_port}"
            grpc_server, grpc_health, grpc_port = build_grpc_server(services, address)
            await grpc_server.start()
            await set_serving(grpc_health, True)
        return cls(config, services, http, grpc_server, grpc_health, grpc_port)

    async def serve(self, stop: asyncio.Event) -> None:
        """Serve HTTP until `stop` is set (or uvicorn exits), then drain and close."""
        http_task = asyncio.create_task(self.http.serve(), name="http")
        stop_task = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({http_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        await self.drain(http_task)

    async def drain(self, http_task: asyncio.Task[None]) -> None:
        """Refuse new requests, give in-flight ones `drain_grace_s` seconds, close."""
        log.info("draining: %d requests in flight", self.services.generator.num_inflight)
        self.services.generator.draining = True
        grace = self.config.drain_grace_s
        stops = []
        if self.grpc_server is not None and self.grpc_health is not None:
            await set_serving(self.grpc_health, False)
            stops.append(self.grpc_server.stop(grace))
        self.http.should_exit = True
        stops.append(http_task)
        await asyncio.gather(*stops, return_exceptions=True)
        await self.services.close()


async def run(config: RouterConfig) -> None:
    """Run the router until SIGTERM / SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await RouterServer.start(config)
    log.info(
        "router for %s: http://%s:%d, grpc port %s, workers: %s",
        config.served_model_name,
        config.host,
        config.port,
        server.grpc_port or "off",
        server.services.registry.workers,
    )
    await server.serve(stop)
