"""`baton autoscale`: the SLO autoscaler of prefill and decode Deployments on Kubernetes, and the
policy flags it shares with `baton serve --autoscale` (which scales local workers)."""

from __future__ import annotations

import argparse
import logging
import threading
from pathlib import Path
from typing import Any

from launcher.command import UsageError, add_subcommand

# flag -> (policy role or "", field, type, help)
POLICY_FLAGS: dict[str, tuple[str, str, type, str]] = {
    "--prefill-min": ("prefill", "min_replicas", int, "fewest prefill replicas"),
    "--prefill-max": ("prefill", "max_replicas", int, "most prefill replicas"),
    "--decode-min": ("decode", "min_replicas", int, "fewest decode replicas"),
    "--decode-max": ("decode", "max_replicas", int, "most decode replicas"),
    "--ttft-slo": ("prefill", "ttft_slo_s", float, "time-to-first-token p90 SLO, seconds"),
    "--itl-slo": ("decode", "itl_slo_s", float, "inter-token latency p90 SLO, seconds"),
    "--prefill-queue-tokens": ("prefill", "tokens_per_replica", float,
                               "queued prompt tokens one prefill replica may hold"),
    "--decode-kv-high": ("decode", "kv_high", float, "mean KV usage (0-1) that adds a decode"),
    "--decode-running": ("decode", "running_per_replica", float,
                         "running requests per decode replica that add one"),
    "--scale-up-intervals": ("*", "up_intervals", int, "intervals of pressure before a step up"),
    "--scale-down-intervals": ("*", "down_intervals", int, "quiet intervals before a step down"),
    "--scale-up-cooldown": ("*", "up_cooldown_s", float, "seconds after a change before a step up"),
    "--scale-down-cooldown": ("*", "down_cooldown_s", float,
                              "seconds after a change before a step down"),
    "--manual-cooldown": ("", "manual_cooldown_s", float,
                          "seconds of no steps after someone else changes the replicas"),
}  # fmt: skip


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    """The policy's flags (defaults: cluster.autoscale.policy's)."""
    group = parser.add_argument_group("autoscaling policy", "defaults: the policy's own")
    for flag, (_, _, kind, text) in POLICY_FLAGS.items():
        group.add_argument(flag, type=kind, default=None, help=text)


def autoscale_config(args: argparse.Namespace) -> Any:
    """The AutoscaleConfig the policy flags describe; UsageError for a bad one."""
    from dataclasses import replace

    from cluster.autoscale.policy import AutoscaleConfig

    config = AutoscaleConfig()
    changes: dict[str, dict[str, Any]] = {"prefill": {}, "decode": {}, "": {}}
    for flag, (role, name, _, _) in POLICY_FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            for target in ("prefill", "decode") if role == "*" else (role,):
                changes[target][name] = value
    try:
        return replace(
            config,
            prefill=replace(config.prefill, **changes["prefill"]),
            decode=replace(config.decode, **changes["decode"]),
            **changes[""],
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def add_autoscale(commands: Any) -> None:
    """Register `baton autoscale`."""
    text = "Scale prefill and decode Deployments on their SLOs (Kubernetes)."
    sub = add_subcommand(commands, "autoscale", text)
    sub.add_argument("--config", type=Path, metavar="FILE.yaml",
                     help="flags from a YAML file (the command line wins)")  # fmt: skip
    sub.add_argument("--kubernetes", action="store_true", required=True,
                     help="scale Kubernetes Deployments (the only backend of this command; "
                     "`baton serve --autoscale` scales local workers)")  # fmt: skip
    sub.add_argument("--namespace", default="default", metavar="NS")
    sub.add_argument("--prefill-deployment", required=True, metavar="NAME")
    sub.add_argument("--decode-deployment", required=True, metavar="NAME")
    routers = sub.add_mutually_exclusive_group(required=True)
    routers.add_argument("--router-url", action="append", metavar="URL",
                         help="a router's base URL (its /metrics is scraped); repeat for several")
    routers.add_argument("--router-service", metavar="NAME",
                         help="the routers' Service in --namespace: every ready router pod "
                         "(its EndpointSlices) is scraped")
    sub.add_argument("--router-port", type=int, default=None, metavar="PORT",
                     help="with --router-service: the routers' HTTP port on each pod "
                     "(default: the Service's port named http)")  # fmt: skip
    sub.add_argument("--interval", type=float, default=15.0, metavar="S",
                     help="seconds between decisions (default: %(default)s)")
    sub.add_argument("--kubeconfig", default="", metavar="FILE",
                     help="default: the in-cluster service account")
    sub.add_argument("--worker-metrics-port", type=int, default=None, metavar="PORT",
                     help="the workers' Prometheus port, scraped on each running pod "
                     "(default: none: TTFT and ITL from the routers only)")
    sub.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                     help="serve the autoscaler's own /metrics (desired and actual replicas) "
                     "on this port, all interfaces (default: off)")  # fmt: skip
    sub.add_argument("--steps", type=int, default=0, metavar="N",
                     help="stop after N decisions (default: 0, run until a signal)")  # fmt: skip
    add_policy_args(sub)
    sub.set_defaults(run=run_autoscale, config_parser=sub)


def run_autoscale(args: argparse.Namespace) -> int:
    """`baton autoscale --kubernetes ...`: decide every interval until stopped."""
    from cluster.autoscale.collector import MetricsCollector
    from cluster.autoscale.kubernetes import KubernetesActuator
    from cluster.autoscale.loop import Autoscaler

    if args.interval <= 0:
        raise UsageError(f"--interval must be > 0, got {args.interval}")
    if args.router_port is not None and not args.router_service:
        raise UsageError("--router-port needs --router-service")
    config = autoscale_config(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s autoscale %(message)s")
    deployments = {"prefill": args.prefill_deployment, "decode": args.decode_deployment}
    actuator = KubernetesActuator.connect(
        args.namespace, deployments, args.kubeconfig, args.worker_metrics_port
    )
    collector = MetricsCollector(router_targets(args, actuator), actuator.worker_metrics_urls)
    autoscaler = Autoscaler(actuator, collector, config, args.interval)
    if args.metrics_port is not None:
        from cluster.autoscale_metrics import AutoscalerMetrics

        autoscaler.metrics = AutoscalerMetrics()
        autoscaler.metrics.serve(args.metrics_port, host="0.0.0.0")
    if args.steps:
        for i in range(args.steps):
            if i:
                threading.Event().wait(args.interval)
            decision = autoscaler.step()
            print(f"prefill {decision.prefill.current} -> {decision.prefill.desired} "
                  f"({decision.prefill.reason}); decode {decision.decode.current} -> "
                  f"{decision.decode.desired} ({decision.decode.reason})", flush=True)  # fmt: skip
        return 0
    autoscaler.run(threading.Event())  # until SIGTERM / Ctrl-C
    return 0


def router_targets(args: argparse.Namespace, actuator: Any) -> Any:
    """The routers' /metrics URLs: those of --router-url, or a function listing every ready
    pod of --router-service at each scrape."""
    if args.router_url:
        return [url.rstrip("/") + "/metrics" for url in args.router_url]
    from cluster.autoscale.kubernetes import RouterPods

    pods = RouterPods(actuator.api_client, args.namespace, args.router_service, args.router_port)
    return pods.metrics_urls
