"""Process entry point shared by the worker services: flags, engine thread, gRPC server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from common.config_file import config_file_args
from engine.async_core import AsyncEngineCore
from prefix_index.base import IndexWriter
from prefix_index.publisher import KVEventPublisher, RouterIndexWriter
from worker_common.engine_args import (
    add_index_args,
    add_worker_args,
    build_engine_core,
    publishes_kv_events,
)
from worker_common.metrics import WorkerMetrics
from worker_common.server import Registration, serve

Setup = Callable[
    [argparse.Namespace, AsyncEngineCore, WorkerMetrics], Awaitable[list[Registration]]
]


DRAIN_GRACE_S = 10.0  # the Helm chart's prefill/decode.drainGraceSeconds default


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def worker_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    add_worker_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: a free one)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics")
    parser.add_argument("--drain-grace", type=_seconds, default=DRAIN_GRACE_S, metavar="SECONDS",
                        help="on SIGTERM: report NOT_SERVING and give in-flight requests this "
                        "long before stopping (default: %(default)s)")  # fmt: skip
    add_index_args(parser)
    parser.add_argument("--config", type=Path, metavar="FILE.yaml",
                        help="flags from a YAML file: keys are long flag names (- or _), the "
                        "command line wins (the Helm chart's engine ConfigMap)")  # fmt: skip
    return parser


def parse_worker_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """`argv` (default: sys.argv[1:]) parsed, with the flags of its `--config` file placed
    before the typed ones; a bad file exits with status 2 and a message naming its key."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)  # the file may hold required flags
    first.add_argument("--config", type=Path)
    path = first.parse_known_args(argv)[0].config
    if path is None:
        return parser.parse_args(argv)
    try:
        words = config_file_args(path, parser)
    except ValueError as exc:
        parser.error(str(exc))
    return parser.parse_args([*words, *argv])


def index_writer(args: argparse.Namespace, model_name: str) -> IndexWriter:
    if args.index_redis_url:
        from prefix_index.redis_store import RedisIndexWriter, connect, namespace

        return RedisIndexWriter(
            connect(args.index_redis_url), namespace(args.cluster_name, model_name)
        )
    return RouterIndexWriter(args.index_router)


def run_worker(args: argparse.Namespace, role: str, setup: Setup) -> None:
    """Build the engine, let `setup` create the servicers, serve until SIGTERM.

    Prints `READY <role> <host>:<port>` on stdout once serving (`cluster.start_worker` waits
    for it).
    """
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {role} %(levelname)s %(message)s")
    try:
        core = build_engine_core(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    engine = AsyncEngineCore(core)
    metrics = WorkerMetrics(role, core.config.model.served_model_name)
    metrics.attach(engine)
    metrics.export_config(core)
    metrics.watch_structured_outputs(core.structured)
    metrics.watch_spec_decode(core.scheduler.spec_stats)
    engine.start()

    publishers: list[tuple[KVEventPublisher, asyncio.Task]] = []

    def ready(port: int) -> None:
        if publishes_kv_events(args):
            model = engine.config.model.served_model_name
            worker_id = args.worker_id or f"{args.host}:{port}"
            publisher = KVEventPublisher(
                engine, index_writer(args, model), worker_id, role, ttl_s=args.index_ttl
            )
            publishers.append((publisher, asyncio.get_running_loop().create_task(publisher.run())))
        print(f"READY {role} {args.host}:{port}", flush=True)

    async def main() -> None:
        registrations = await setup(args, engine, metrics)
        await serve(registrations, args.host, args.port, args.metrics_port, on_ready=ready,
                    grace_s=args.drain_grace)
        for publisher, task in publishers:  # drained: the worker's index entries leave with it
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await publisher.retire()
            await publisher.writer.close()

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
