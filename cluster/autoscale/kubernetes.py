"""The Kubernetes actuator: the prefill and decode Deployments' scale subresource.

Replicas are the Deployment's `spec.replicas` (what was asked for, so a manual `kubectl scale`
shows at once); pending replicas are its pods (found by the scale's label selector) in phase
Pending. Credentials: in-cluster (the autoscaler's service account, RBAC in the Helm chart) or a
kubeconfig file. Draining on scale-down happens in the pod that goes: Kubernetes sends it
SIGTERM (after the chart's preStop hook), its endpoint turns terminating so every router stops
sending it requests (`router.discovery`), and the worker finishes its in-flight ones within
its termination grace period.
"""

from __future__ import annotations

import logging
from typing import Any

from cluster.autoscale.actuator import ROLES, Actuator, Replicas, register_actuator
from router.discovery import list_service_slices, ready_addresses

log = logging.getLogger(__name__)


@register_actuator("kubernetes")
class KubernetesActuator(Actuator):
    """Scales `deployments` ({"prefill": name, "decode": name}) in `namespace`.

    `metrics_port`: the workers' Prometheus port, so the collector scrapes each running pod."""

    def __init__(
        self,
        namespace: str,
        deployments: dict[str, str],
        api_client: Any,  # kubernetes.client.ApiClient
        metrics_port: int | None = None,
    ) -> None:
        from kubernetes import client

        unknown = set(deployments) - set(ROLES)
        if unknown:
            raise ValueError(f"deployments: unknown role {sorted(unknown)[0]!r}")
        self.namespace, self.deployments = namespace, deployments
        self.api_client = api_client
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.metrics_port = metrics_port
        self._pod_ips: dict[str, list[str]] = {}

    @classmethod
    def connect(
        cls,
        namespace: str,
        deployments: dict[str, str],
        kubeconfig: str = "",
        metrics_port: int | None = None,
    ) -> KubernetesActuator:
        """With in-cluster credentials, or those of `kubeconfig`."""
        from kubernetes import client
        from kubernetes import config as kube_config

        if kubeconfig:
            api_client = kube_config.new_client_from_config(config_file=kubeconfig)
        else:
            kube_config.load_incluster_config()
            api_client = client.ApiClient()
        return cls(namespace, deployments, api_client, metrics_port)

    def replicas(self, role: str) -> Replicas:
        name = self.deployments[role]
        scale: Any = self.apps.read_namespaced_deployment_scale(name, self.namespace)
        pods: list[Any] = self.core.list_namespaced_pod(
            self.namespace, label_selector=scale.status.selector or ""
        ).items
        alive = [p for p in pods if p.metadata.deletion_timestamp is None]
        pending = len([p for p in alive if p.status.phase == "Pending"])
        self._pod_ips[role] = [
            p.status.pod_ip for p in alive if p.status.phase == "Running" and p.status.pod_ip
        ]
        return Replicas(int(scale.spec.replicas or 0), pending)

    def scale(self, role: str, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        self.apps.patch_namespaced_deployment_scale(self.deployments[role], self.namespace, body)

    def worker_metrics_urls(self) -> list[str]:
        if self.metrics_port is None:
            return []
        hosts = [f"[{ip}]" if ":" in ip else ip for ips in self._pod_ips.values() for ip in ips]
        return [f"http://{host}:{self.metrics_port}/metrics" for host in hosts]


class RouterPods:
    """The /metrics URLs of every ready router pod, from the router Service's EndpointSlices
    (read as the router reads its workers'): each scrape reaches every router, not the one the
    Service picks. `port`: the routers' HTTP port (default: the slices' port named http)."""

    def __init__(
        self, api_client: Any, namespace: str, service: str, port: int | None = None
    ) -> None:
        from kubernetes import client

        self.api = client.DiscoveryV1Api(api_client)
        self.namespace, self.service, self.port = namespace, service, port
        self._urls: list[str] = []

    def metrics_urls(self) -> list[str]:
        """The routers' /metrics URLs now; the last ones known if the API server fails."""
        try:
            slices = list_service_slices(self.api, self.namespace, self.service)
        except Exception as error:  # the API server's errors are many; keep the last view
            log.warning("cannot list the endpoints of service %s: %s", self.service, error)
            return self._urls
        addresses = ready_addresses(slices, port_name="http", port_override=self.port)
        self._urls = [f"http://{address}/metrics" for address in addresses]
        return self._urls
