"""The gRPC server every worker runs: its services, health, reflection, graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

log = logging.getLogger(__name__)

Registration = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]  # add_fn, servicer, name


async def serve(
    registrations: Sequence[Registration],
    host: str,
    port: int,
    metrics_port: int | None = None,
    on_ready: Callable[[int], None] | None = None,
    grace_s: float = 10.0,
) -> None:
    """Serve until SIGTERM/SIGINT, then report NOT_SERVING and drain for up to `grace_s`.

    `on_ready(port)` is called once the server listens (port 0 picks a free one).
    """
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [name for _, _, name in registrations]
    for add, servicer, _ in registrations:
        add(servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if metrics_port is not None:
        start_http_server(metrics_port, addr=host)
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if on_ready is not None:
        on_ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: no new requests, %.0f s for in-flight ones", grace_s)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)
