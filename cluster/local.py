"""A cluster on one machine, as local processes (what `baton serve` and `baton bench` start).

`start_cluster(spec)` starts the workers (prefill, decode, colocated) on free ports, then the
router(s) with their addresses, and returns once every router answers `/health`;
`Cluster.stop()` stops the routers first (they drain in-flight requests), then the workers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from router.config import API_KEY_ENV

ROUTER_READY_TIMEOUT_S = 120.0


@dataclass
class ClusterSpec:
    """What to start. Counts are processes; `worker_args` go to every worker."""

    model: Path
    prefill: int = 1
    decode: int = 1
    colocated: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 50051
    policy: str = ""  # "": the router's default (prefix_aware with an index)
    routers: int = 1  # routers on consecutive ports; more than one shares a Redis index
    redis_url: str = ""  # the prefix index in Redis ("" = in-process in each router)
    cluster_name: str = "default"
    worker_args: list[str] = field(default_factory=list)
    prefill_args: list[str] = field(default_factory=list)  # for prefill workers only
    router_args: list[str] = field(default_factory=list)
    num_gpus: int | None = None  # None: as many as torch sees; 0: CPU workers
    kv_transport: str = ""  # decode workers' KV transport; "": by placement (kv_transport_args)
    api_key: str = ""  # routers require it (Bearer) on /v1/* and gRPC Generate; "": open

    @property
    def num_workers(self) -> int:
        return self.prefill + self.decode + self.colocated

    def threads_per_worker(self) -> int:
        """CPU threads for each worker's torch: the cores shared out, so workers on one machine
        do not oversubscribe it (OpenMP threads spinning against each other stall everyone)."""
        return max(1, (os.cpu_count() or 1) // max(1, self.num_workers))

    def router_ports(self) -> list[tuple[int, int]]:
        """(HTTP port, gRPC port) of each router."""
        return [(self.port + i, self.grpc_port + i) for i in range(self.routers)]

    def index_args(self) -> list[str]:
        """How workers publish KV events: to Redis, or to every router's in-process index."""
        if self.redis_url:
            return ["--index-redis-url", self.redis_url, "--cluster-name", self.cluster_name]
        return ["--index-router", *(f"{self.host}:{g}" for _, g in self.router_ports())]


@dataclass
class WorkerHandle:
    """One worker process: its role, gRPC address (host:port) and Prometheus endpoint."""

    role: str
    proc: subprocess.Popen
    address: str
    metrics_url: str
    device: str = "cpu"  # "cpu" or "gpu N"


@dataclass
class Cluster:
    """The running processes; `stop()` ends them, router first."""

    workers: list[WorkerHandle] = field(default_factory=list)
    routers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def router(self) -> subprocess.Popen | None:
        return self.routers[0] if self.routers else None

    def stop(self, grace_s: float = 15.0) -> None:
        procs = [*self.routers, *(w.proc for w in self.workers)]
        for proc in procs:  # router first: it drains, then the workers go
            _terminate(proc, grace_s)


def _terminate(proc: subprocess.Popen, grace_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_port_run(count: int, host: str = "127.0.0.1", avoid: range = range(0)) -> int:
    """A port p where p .. p + count - 1 are all free now and none is in `avoid`: the base of
    a cluster's routers, which listen on consecutive ports (`ClusterSpec.router_ports`)."""
    for _ in range(200):
        base = free_port(host)
        run = range(base, base + count)
        if run.stop <= 65536 and not set(run) & set(avoid) and all(map(_bindable, run)):
            return base
    raise RuntimeError(f"found no {count} consecutive free ports")


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def gpu_for_worker(index: int, num_gpus: int) -> int | None:
    """The GPU of the `index`-th worker (prefill workers first, then decode, then colocated):
    round robin, so with as many GPUs as workers each worker has its own (prefill and decode
    on distinct GPUs); None on a machine without GPUs."""
    return index % num_gpus if num_gpus > 0 else None


def kv_transport_args(
    role: str, gpu: int | None, prefill_gpus: set[int | None], forced: str = ""
) -> list[str]:
    """The KV transport of a decode worker (`forced`, or chosen): NCCL on a GPU no prefill
    worker uses; CUDA IPC on a GPU every prefill worker shares (NCCL cannot join two ranks on
    one GPU); TCP otherwise (on the CPU, or with prefill workers on its GPU and on others)."""
    if role != "decode":
        return []
    if forced:
        return ["--kv-transport", forced]
    if gpu is None:
        return []
    if gpu not in prefill_gpus:
        return ["--kv-transport", "nccl"]
    if prefill_gpus == {gpu}:
        return ["--kv-transport", "cuda-ipc"]
    return []


def check_kv_transport(transport: str, num_gpus: int) -> None:
    """`ValueError` for a forced KV transport that cannot work: unknown, or a GPU one (nccl,
    cuda-ipc) for workers without GPUs."""
    from kv_transfer.dispatch import GPU_TRANSPORTS, TRANSPORTS

    if transport and transport not in TRANSPORTS:
        raise ValueError(f"kv_transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    if transport in GPU_TRANSPORTS and num_gpus == 0:
        raise ValueError(f"kv_transport {transport!r} needs GPU workers; this machine has none")


def visible_gpus(spec: ClusterSpec) -> int:
    """GPUs the workers may use: `spec.num_gpus`, else as many as torch sees."""
    if spec.num_gpus is not None:
        return spec.num_gpus
    import torch

    return torch.cuda.device_count()


def start_worker(
    role: str, module: str, spec: ClusterSpec, extra: list[str], gpu: int | None = None
) -> WorkerHandle:
    """Start one worker process (on GPU `gpu`, or the CPU); return it once it printed READY."""
    metrics_port = free_port(spec.host)
    cmd = [sys.executable, "-m", module, "--model", str(spec.model), "--host", spec.host]
    cmd += ["--metrics-port", str(metrics_port)]
    cmd += spec.index_args()
    env = _env()
    if gpu is not None:
        # Every worker sees every GPU (NCCL needs that for peer-to-peer over NVLink).
        cmd += ["--device", f"cuda:{gpu}"]
    elif "--num-threads" not in spec.worker_args:
        cmd += ["--num-threads", str(spec.threads_per_worker())]
    proc = subprocess.Popen(
        [*cmd, *spec.worker_args, *extra], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        _terminate(proc, 5)
        raise RuntimeError(f"{module} failed to start (see its log above)")
    metrics_url = f"http://{spec.host}:{metrics_port}/metrics"
    device = "cpu" if gpu is None else f"gpu {gpu}"
    return WorkerHandle(role, proc, line.split()[-1], metrics_url, device)


def start_cluster(spec: ClusterSpec) -> Cluster:
    """Start workers then the router; raise RuntimeError (after cleaning up) on failure."""
    cluster = Cluster()
    roles = [
        ("prefill", "prefill_service", [], spec.prefill),
        ("decode", "decode_service", ["--role", "decode"], spec.decode),
        ("colocated", "decode_service", ["--role", "colocated"], spec.colocated),
    ]
    num_gpus = visible_gpus(spec)
    check_kv_transport(spec.kv_transport, num_gpus)
    prefill_gpus = {gpu_for_worker(i, num_gpus) for i in range(spec.prefill)}
    try:
        for role, module, extra, count in roles:
            for _ in range(count):
                gpu = gpu_for_worker(len(cluster.workers), num_gpus)
                args = [*extra, *kv_transport_args(role, gpu, prefill_gpus, spec.kv_transport)]
                if role == "prefill":
                    args += spec.prefill_args
                cluster.workers.append(start_worker(role, module, spec, args, gpu))
        for port, grpc_port in spec.router_ports():
            cluster.routers.append(_start_router(spec, cluster, port, grpc_port))
        for router, (port, _) in zip(cluster.routers, spec.router_ports(), strict=True):
            _wait_healthy(spec.host, port, router)
    except BaseException:
        cluster.stop(grace_s=5)
        raise
    return cluster


def stop_worker(worker: WorkerHandle, grace_s: float = 15.0) -> None:
    """SIGTERM (the worker drains and retires its index entries), SIGKILL after `grace_s`."""
    _terminate(worker.proc, grace_s)


def _start_router(
    spec: ClusterSpec, cluster: Cluster, port: int, grpc_port: int
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "router", "--model", str(spec.model), "--host", spec.host]
    cmd += ["--port", str(port), "--grpc-port", str(grpc_port)]
    if spec.policy:
        cmd += ["--policy", spec.policy]
    if spec.redis_url:
        cmd += ["--redis-url", spec.redis_url, "--cluster-name", spec.cluster_name]
    cmd += spec.router_args
    for role in ("prefill", "decode", "colocated"):
        addresses = [w.address for w in cluster.workers if w.role == role]
        if addresses:
            cmd += [f"--{role}", *addresses]
    env = _env()
    if spec.api_key:  # by environment: a command line is visible to every user (ps)
        env[API_KEY_ENV] = spec.api_key
    return subprocess.Popen(cmd, env=env)


def _wait_healthy(host: str, port: int, router: subprocess.Popen) -> None:
    url = f"http://{host}:{port}/health"
    deadline = time.time() + ROUTER_READY_TIMEOUT_S
    while time.time() < deadline:
        if router.poll() is not None:
            raise RuntimeError(f"the router exited with status {router.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the router did not become healthy at {url}")


def _env() -> dict[str, str]:
    """Children import the repository's packages even when Baton is not installed; only a
    router given `ClusterSpec.api_key` gets an API key (not one inherited from this process)."""
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
