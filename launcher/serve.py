"""`baton serve`: the cluster on this machine, with `vllm serve`'s flag names.

Engine flags (model, KV cache, scheduler groups: worker_common.engine_args) go to every worker;
--served-model-name, --max-model-len and --chat-template go to the router(s) too; --api-key goes
to the routers through their environment. `--config FILE.yaml` supplies any flag (see
launcher.config_file); the command line wins over the file.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from cluster import ClusterSpec, start_cluster
from launcher.autoscale import add_policy_args, autoscale_config
from launcher.command import UsageError, add_subcommand, resolve_model_dir
from router.config import API_KEY_ENV, add_tool_args, load_chat_template, tool_settings
from worker_common.engine_args import MODEL, add_engine_args, engine_cli_args


def add_serve(commands: Any) -> None:
    """Register `baton serve` and its flags, grouped as vLLM's."""
    sub = add_subcommand(commands, "serve", "Serve the OpenAI API and gRPC with local workers.")
    sub.add_argument("--config", type=Path, metavar="FILE.yaml",
                     help="flags from a YAML file: keys are long flag names (- or _), the "
                     "command line wins")  # fmt: skip
    model = sub.add_argument_group(MODEL, "the model, its context and numerics")
    model.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="local Hugging Face model directory (default: the demo model)",
    )
    add_engine_args(sub, {MODEL: model})
    _add_api_server_args(sub)
    add_tool_args(sub)
    _add_cluster_args(sub)
    transfer = sub.add_argument_group("KV transfer", "moving KV from prefill to decode workers")
    transfer.add_argument(
        "--kv-transport",
        default="",
        choices=["", "tcp", "nccl", "cuda-ipc"],
        help="how prefill workers push KV to decode workers (default: by placement: nccl between"
        " GPUs, cuda-ipc on a shared GPU, tcp on CPUs)",
    )
    scaling = sub.add_argument_group("autoscaling", "local prefill and decode workers on SLOs")
    scaling.add_argument("--autoscale", action="store_true",
                         help="add and remove prefill and decode workers as load and SLOs "
                         "ask (policy flags below)")  # fmt: skip
    scaling.add_argument("--autoscale-interval", type=float, default=5.0, metavar="S",
                         help="seconds between decisions (default: %(default)s)")  # fmt: skip
    scaling.add_argument("--autoscale-metrics-port", type=int, default=None, metavar="PORT",
                         help="serve the autoscaler's /metrics (desired and actual replicas) "
                         "on --host at this port, 0 for a free one, printed at start "
                         "(default: off)")  # fmt: skip
    add_policy_args(sub)
    sub.set_defaults(run=run_serve, config_parser=sub)


def _add_api_server_args(sub: argparse.ArgumentParser) -> None:
    api = sub.add_argument_group("API server", "the routers' OpenAI HTTP and gRPC fronts")
    api.add_argument(
        "--host", default="127.0.0.1", help="address of every process (default: %(default)s)"
    )
    api.add_argument(
        "--port",
        type=int,
        default=8000,
        metavar="PORT",
        help="OpenAI HTTP port (default: %(default)s)",
    )
    api.add_argument(
        "--grpc-port",
        type=int,
        default=50051,
        metavar="PORT",
        help="public gRPC port (default: %(default)s)",
    )
    api.add_argument("--api-key", default=None, metavar="KEY",
                     help="require `Authorization: Bearer KEY` on /v1/* and gRPC Generate "
                     f"(default: ${API_KEY_ENV}, else none)")  # fmt: skip
    api.add_argument("--chat-template", default=None, metavar="FILE|TEMPLATE",
                     help="the chat template: a file, or the Jinja template itself "
                     "(default: the tokenizer's)")  # fmt: skip


def _add_cluster_args(sub: argparse.ArgumentParser) -> None:
    cluster = sub.add_argument_group("cluster", "the processes and how requests are routed")
    pair_help = "default 1, or 0 with --colocated"
    cluster.add_argument("--prefill-workers", type=int, default=None, metavar="N", help=pair_help)
    cluster.add_argument("--decode-workers", type=int, default=None, metavar="N", help=pair_help)
    cluster.add_argument(
        "--colocated",
        type=int,
        default=0,
        metavar="N",
        help="colocated workers (both roles; default: 0)",
    )
    cluster.add_argument(
        "--policy",
        default="",
        choices=["", "round_robin", "least_loaded", "prefix_aware"],
        help="routing (default: prefix_aware)",
    )
    cluster.add_argument(
        "--routers",
        type=int,
        default=1,
        metavar="N",
        help="routers on consecutive ports (default: 1; more need --redis-url)",
    )
    cluster.add_argument(
        "--redis-url",
        default="",
        metavar="URL",
        help="the prefix index in Redis, redis://... (default: in-process, in each router)",
    )
    cluster.add_argument(
        "--cluster-name",
        default="default",
        metavar="NAME",
        help="Redis key namespace part (default: %(default)s)",
    )


def cluster_spec(args: argparse.Namespace) -> ClusterSpec:
    """The ClusterSpec the parsed `baton serve` flags describe; UsageError for a bad one."""
    default_pair = 0 if args.colocated else 1
    prefill = default_pair if args.prefill_workers is None else args.prefill_workers
    decode = default_pair if args.decode_workers is None else args.decode_workers
    if (prefill == 0) != (decode == 0):
        raise UsageError("--prefill-workers and --decode-workers must both be 0 or both >= 1")
    if prefill + decode + args.colocated == 0:
        raise UsageError("no workers: give --prefill-workers/--decode-workers or --colocated")
    if args.routers < 1 or (args.routers > 1 and not args.redis_url):
        raise UsageError("--routers must be >= 1, and more than one router needs --redis-url")
    try:
        load_chat_template(args.chat_template)  # a bad one fails here, before any process starts
        tool_settings(args)  # so do bad tool flags
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return ClusterSpec(
        model=resolve_model_dir(args.model),
        prefill=prefill,
        decode=decode,
        colocated=args.colocated,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        policy=args.policy,
        routers=args.routers,
        redis_url=args.redis_url,
        cluster_name=args.cluster_name,
        worker_args=engine_cli_args(args),
        router_args=router_cli_args(args),
        kv_transport=args.kv_transport,
        api_key=args.api_key or os.environ.get(API_KEY_ENV, ""),
    )


def router_cli_args(args: argparse.Namespace) -> list[str]:
    """The router-side flags the user set, as the router's command-line words."""
    words: list[str] = []
    for name in ("served_model_name", "max_model_len", "chat_template"):
        value = getattr(args, name)
        if value is not None:
            words += ["--" + name.replace("_", "-"), str(value)]
    return words + tool_settings(args).cli_args()


class Scaling(NamedTuple):
    """How `baton serve --autoscale` scales its workers."""

    config: Any  # cluster.autoscale.policy.AutoscaleConfig
    interval_s: float
    metrics_port: int | None = None  # the autoscaler's /metrics (0: a free port; None: off)


def scaling_from_args(args: argparse.Namespace, spec: ClusterSpec) -> Scaling | None:
    """The `--autoscale*` flags as a Scaling (None without --autoscale); UsageError if bad."""
    port = args.autoscale_metrics_port
    if not args.autoscale:
        if port is not None:
            raise UsageError("--autoscale-metrics-port needs --autoscale")
        return None
    if spec.colocated or not spec.prefill:
        raise UsageError("--autoscale scales prefill and decode workers; not --colocated")
    if args.autoscale_interval <= 0:
        raise UsageError(f"--autoscale-interval must be > 0, got {args.autoscale_interval}")
    if port is not None and not 0 <= port <= 65535:
        raise UsageError(f"--autoscale-metrics-port must be 0-65535, got {port}")
    return Scaling(autoscale_config(args), args.autoscale_interval, port)


def run_serve(args: argparse.Namespace) -> int:
    """`baton serve`: start the cluster and serve until a signal."""
    spec = cluster_spec(args)
    scaling = scaling_from_args(args, spec)
    try:
        return serve_forever(spec, scaling)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def serve_forever(spec: ClusterSpec, scaling: Scaling | None = None) -> int:
    """Start the cluster `spec` describes, print the endpoints, wait for a signal, stop.
    `scaling`: how to autoscale its workers (None: a fixed set)."""
    cluster = start_cluster(spec)
    try:
        stop_scaling, scaling_metrics = (
            _start_autoscaler(spec, cluster, scaling) if scaling else (None, "")
        )
    except BaseException:
        cluster.stop()
        raise
    print(f"Baton is serving {spec.model.name}:")
    for port, grpc_port in spec.router_ports():
        print(f"  OpenAI HTTP  http://{spec.host}:{port}/v1  (health /health, metrics /metrics)")
        print(f"  gRPC         {spec.host}:{grpc_port}  (baton.v1.Router/Generate)")
    print(f"  prefix index {spec.redis_url or 'in-process, in each router'}")
    for w in cluster.workers:
        print(f"  {w.role:<9}    {w.address}  ({w.device}, metrics {w.metrics_url})")
    if scaling:
        print(f"  autoscaling  every {scaling.interval_s} s (admin API /admin/workers)")
    if scaling_metrics:
        print(f"  autoscaler   metrics {scaling_metrics}")
    print("Ctrl-C or SIGTERM drains and stops.", flush=True)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        while not stopping:
            if any(router.poll() is not None for router in cluster.routers):
                print("a router exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
    finally:
        if stop_scaling is not None:
            stop_scaling()
        cluster.stop()
    return 0


def _start_autoscaler(
    spec: ClusterSpec, cluster: Any, scaling: Scaling
) -> tuple[Callable[[], None], str]:
    """Run the autoscaler over the local cluster in a thread; return what stops it and the
    URL of its /metrics ("" when not served)."""
    from cluster.autoscale.collector import MetricsCollector
    from cluster.autoscale.local import LocalActuator
    from cluster.autoscale.loop import Autoscaler
    from cluster.autoscale_metrics import AutoscalerMetrics

    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("cluster.autoscale").setLevel(logging.INFO)  # each decision that acts
    actuator = LocalActuator(spec, cluster)
    routers = [f"http://{spec.host}:{port}/metrics" for port, _ in spec.router_ports()]
    collector = MetricsCollector(routers, actuator.worker_metrics_urls)
    autoscaler = Autoscaler(actuator, collector, scaling.config, scaling.interval_s)
    server, url = None, ""
    if scaling.metrics_port is not None:
        autoscaler.metrics = AutoscalerMetrics()
        try:
            server = autoscaler.metrics.serve(scaling.metrics_port, host=spec.host)
        except OSError as exc:
            actuator.close()
            raise RuntimeError(f"--autoscale-metrics-port {scaling.metrics_port}: {exc}") from exc
        url = f"http://{spec.host}:{server.server_port}/metrics"
    thread, stop = autoscaler.start()

    def stop_autoscaler() -> None:
        stop.set()
        thread.join()
        actuator.close()
        if server is not None:
            server.shutdown()
            server.server_close()

    return stop_autoscaler, url
