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
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from prefix_index.memory import InProcessPrefixIndex
from prefix_index.service import ADD_TO_SERVER as add_index_servicer
from prefix_index.service import SERVICE_NAME as INDEX_SERVICE_NAME
from prefix_index.service import PrefixIndexServicer
from proto.baton.v1 import router_pb2_grpc
from router.auth import APIKeyInterceptor
from router.config import RouterConfig
from router.grpc_service import SERVICE_NAME, RouterServicer, set_serving
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
        uv_config = uvicorn.Config(
            build_app(services),
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


def build_grpc_server(
    services: RouterServices, address: str
) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    """A grpc.aio server on `address` with the Router service (behind the API key, when one is
    set), health, reflection, and the prefix-index service when the index is in-process;
    returns it (not started), its health servicer and the bound port.

    It is `router.grpc_service.build_grpc_server` plus the API-key interceptor, which grpc.aio
    takes only when a server is made: once that function takes `interceptors`, this one goes.
    """
    interceptors = []
    if services.config.api_key:
        on_reject = services.metrics.request_failed
        interceptors.append(APIKeyInterceptor(services.config.api_key, [SERVICE_NAME], on_reject))
    # No SO_REUSEPORT: a port another process (or router) holds must be an error, not shared.
    server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(services), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names: tuple[str, ...] = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    if isinstance(services.index, InProcessPrefixIndex):  # workers publish KV events here
        add_index_servicer(PrefixIndexServicer(services.index), server)
        names += (INDEX_SERVICE_NAME,)
    reflection.enable_server_reflection(names, server)
    return server, health_servicer, server.add_insecure_port(address)


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
