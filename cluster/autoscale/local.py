"""The local actuator: adds and removes worker processes of a `cluster.local` cluster.

A new worker starts as `start_worker` starts any (free ports, the cluster's index and engine
flags); once it prints READY every router is told of it (`POST /admin/workers`). A worker that
goes is removed from every router first (`DELETE /admin/workers/ADDR`: no new requests, the
router waits for its in-flight ones), then stopped with SIGTERM, its index entries leaving with
it. Both run in background threads, so a decision interval never waits for a worker to load.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.parse
import urllib.request

from cluster.autoscale.actuator import Actuator, Replicas, register_actuator
from cluster.local import (
    Cluster,
    ClusterSpec,
    WorkerHandle,
    gpu_for_worker,
    kv_transport_args,
    start_worker,
    stop_worker,
    visible_gpus,
)

log = logging.getLogger(__name__)

MODULES = {"prefill": ("prefill_service", []), "decode": ("decode_service", ["--role", "decode"])}


@register_actuator("local")
class LocalActuator(Actuator):
    """Scales the prefill and decode workers of `cluster` (started from `spec`)."""

    def __init__(self, spec: ClusterSpec, cluster: Cluster, drain_timeout_s: float = 60.0) -> None:
        self.spec, self.cluster = spec, cluster
        self.drain_timeout_s = drain_timeout_s
        self._lock = threading.Lock()
        self._starting = {role: 0 for role in MODULES}
        self._leaving: list[WorkerHandle] = []
        self._threads: list[threading.Thread] = []
        self._num_gpus = visible_gpus(spec)

    def replicas(self, role: str) -> Replicas:
        with self._lock:
            starting = self._starting[role]
            return Replicas(len(self._serving(role)) + starting, starting)

    def scale(self, role: str, replicas: int) -> None:
        current = self.replicas(role).actual
        if replicas > current:
            with self._lock:
                self._starting[role] += 1
            self._spawn(self._add, role)
        elif replicas < current:
            with self._lock:
                serving = self._serving(role)
                if not serving:
                    return
                worker = serving[-1]  # the newest goes first
                self._leaving.append(worker)
            self._spawn(self._remove, worker)

    def worker_metrics_urls(self) -> list[str]:
        with self._lock:
            return [w.metrics_url for w in self.cluster.workers]

    def close(self) -> None:
        """Wait for the workers still starting or leaving."""
        for thread in list(self._threads):
            thread.join()

    def _serving(self, role: str) -> list[WorkerHandle]:
        return [w for w in self.cluster.workers if w.role == role and w not in self._leaving]

    def _spawn(self, target, arg) -> None:  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=target, args=(arg,), daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _add(self, role: str) -> None:
        module, extra = MODULES[role]
        try:
            with self._lock:
                index = len(self.cluster.workers)
                prefill_gpus = {w.device for w in self.cluster.workers if w.role == "prefill"}
            gpu = gpu_for_worker(index, self._num_gpus)
            gpus = {int(d.split()[-1]) if d != "cpu" else None for d in prefill_gpus}
            args = [*extra, *kv_transport_args(role, gpu, gpus, self.spec.kv_transport)]
            if role == "prefill":
                args += self.spec.prefill_args
            worker = start_worker(role, module, self.spec, args, gpu)
            with self._lock:
                self.cluster.workers.append(worker)
            for router in self._router_urls():
                self._admin(router, "POST", "/admin/workers",
                            {"address": worker.address, "role": role})  # fmt: skip
            log.info("autoscale: %s worker %s started", role, worker.address)
        except Exception:
            log.exception("autoscale: a %s worker failed to start", role)
        finally:
            with self._lock:
                self._starting[role] -= 1

    def _remove(self, worker: WorkerHandle) -> None:
        try:
            path = f"/admin/workers/{urllib.parse.quote(worker.address)}"
            query = f"?timeout={self.drain_timeout_s}"
            for router in self._router_urls():
                answer = self._admin(router, "DELETE", path + query)
                if not answer.get("drained"):
                    log.warning("autoscale: %s was still busy on %s", worker.address, router)
            stop_worker(worker)
            log.info("autoscale: %s worker %s stopped", worker.role, worker.address)
        except Exception:
            log.exception("autoscale: removing %s failed", worker.address)
        finally:
            with self._lock:
                if worker in self.cluster.workers and worker.proc.poll() is not None:
                    self.cluster.workers.remove(worker)
                self._leaving.remove(worker)

    def _router_urls(self) -> list[str]:
        return [f"http://{self.spec.host}:{port}" for port, _ in self.spec.router_ports()]

    def _admin(self, router: str, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(router + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.spec.api_key:
            request.add_header("Authorization", f"Bearer {self.spec.api_key}")
        with urllib.request.urlopen(request, timeout=self.drain_timeout_s + 10) as response:
            return dict(json.loads(response.read() or b"{}"))
