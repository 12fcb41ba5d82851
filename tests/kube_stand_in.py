"""A stand-in Kubernetes API server over HTTP, for the few endpoints Baton's clients call:

    GET/PATCH /apis/apps/v1/namespaces/NS/deployments/NAME/scale
    GET       /api/v1/namespaces/NS/pods?labelSelector=app=NAME
    GET       /apis/discovery.k8s.io/v1/namespaces/NS/endpointslices?labelSelector=...
    GET       /metrics                                  (any Prometheus text the test sets)

It records every scale PATCH; `kubeconfig(path)` writes a kubeconfig pointing at it, so the
real `kubernetes` client runs unchanged.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass
class KubeState:
    """Deployments (name -> replicas), their pods' phases, Services' endpoints, scale PATCHes."""

    namespace: str = "baton"
    replicas: dict[str, int] = field(default_factory=dict)
    pods: dict[str, list[str]] = field(default_factory=dict)  # deployment -> phase of each pod
    # service -> [(ip, ready, terminating)], in `namespace` only; ports `slice_port` named grpc
    # and `http_port` named http
    endpoints: dict[str, list[tuple[str, bool, bool]]] = field(default_factory=dict)
    slice_port: int = 50051
    http_port: int = 8000
    patches: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    metrics_text: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def scale(self, name: str) -> dict[str, Any]:
        n = self.replicas[name]
        return {
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"replicas": n}, "status": {"replicas": n, "selector": f"app={name}"},
        }  # fmt: skip

    def pod_list(self, selector: str) -> dict[str, Any]:
        name = selector.removeprefix("app=")
        items = [
            {
                "metadata": {"name": f"{name}-{i}", "namespace": self.namespace,
                             "labels": {"app": name}},
                "status": {"phase": phase, "podIP": f"10.0.0.{i + 1}" if phase == "Running"
                           else None},
            }  # fmt: skip
            for i, phase in enumerate(self.pods.get(name, []))
        ]
        return {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    def slice_list(self, namespace: str, selector: str) -> dict[str, Any]:
        service = selector.removeprefix("kubernetes.io/service-name=")
        found = namespace == self.namespace and service in self.endpoints
        endpoints = [
            {"addresses": [ip], "conditions": {"ready": ready, "terminating": terminating}}
            for ip, ready, terminating in self.endpoints.get(service, [])
        ]
        item = {
            "metadata": {"name": f"{service}-abc", "namespace": self.namespace,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "grpc", "port": self.slice_port, "protocol": "TCP"},
                      {"name": "http", "port": self.http_port, "protocol": "TCP"}],
        }  # fmt: skip
        return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                "metadata": {}, "items": [item] if found else []}  # fmt: skip


class _Handler(BaseHTTPRequestHandler):
    state: KubeState

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        selector = parse_qs(url.query).get("labelSelector", [""])[0]
        parts = url.path.strip("/").split("/")
        with self.state.lock:
            if url.path == "/metrics":
                return self._send(200, self.state.metrics_text, "text/plain")
            if parts[-1] == "scale" and parts[-2] in self.state.replicas:
                return self._send(200, self.state.scale(parts[-2]))
            if parts[-1] == "pods":
                return self._send(200, self.state.pod_list(selector))
            if parts[-1] == "endpointslices":
                return self._send(200, self.state.slice_list(parts[-2], selector))
        self._send(404, {"kind": "Status", "status": "Failure", "code": 404})

    def do_PATCH(self) -> None:  # noqa: N802
        parts = urlparse(self.path).path.strip("/").split("/")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.state.lock:
            if parts[-1] != "scale" or parts[-2] not in self.state.replicas:
                return self._send(404, {"kind": "Status", "code": 404})
            self.state.patches.append((parts[-2], body))
            self.state.replicas[parts[-2]] = int(body["spec"]["replicas"])
            return self._send(200, self.state.scale(parts[-2]))

    def _send(self, status: int, body: Any, content_type: str = "application/json") -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class KubeStandIn:
    """The server in a thread: `with KubeStandIn(state) as kube: kube.url ...`."""

    def __init__(self, state: KubeState) -> None:
        handler = type("Handler", (_Handler,), {"state": state})
        self.state = state
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KubeStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig file for this server (a token the server ignores)."""
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "not-checked"}}],
            "contexts": [{"name": "stand-in",
                          "context": {"cluster": "stand-in", "user": "tester"}}],
        }  # fmt: skip
        path.write_text(json.dumps(config))
        return path
