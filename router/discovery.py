"""Workers found on Kubernetes: the ready endpoints of the worker Services' EndpointSlices.

Every `interval_s` the router lists the EndpointSlices of each worker Service (label
`kubernetes.io/service-name`) and makes its registry match their ready endpoints
(`Membership.sync`): a new pod joins once its readiness probe passes; a pod that is
terminating or no longer ready stops getting new requests at once and leaves once this router
has nothing in flight there. The `kubernetes` client is imported only here, and only when
discovery is on (the router image need not carry it otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from router.config import RouterConfig
from router.membership import Membership
from router.workers import Role

log = logging.getLogger(__name__)

PORT_NAME = "grpc"  # the Service port workers serve on; else a slice's first port


def list_service_slices(api: Any, namespace: str, service: str) -> Any:
    """The V1EndpointSliceList of Service `service` (`api`: a kubernetes DiscoveryV1Api)."""
    return api.list_namespaced_endpoint_slice(
        namespace, label_selector=f"kubernetes.io/service-name={service}", _request_timeout=5
    )


def ready_addresses(
    slices: Any, port_name: str = PORT_NAME, port_override: int | None = None
) -> list[str]:
    """`host:port` of every ready, not terminating endpoint in a V1EndpointSliceList: the
    slice's port named `port_name` (else its first), or `port_override` if given."""
    found = []
    for eps in slices.items or []:
        ports = eps.ports or []
        port = next((p.port for p in ports if p.name == port_name), None)
        port = port if port is not None else next((p.port for p in ports), None)
        port = port_override if port_override is not None else port
        if port is None:
            continue
        for endpoint in eps.endpoints or []:
            conditions = endpoint.conditions
            ready = conditions is None or conditions.ready is not False  # unset counts as ready
            if not ready or (conditions is not None and conditions.terminating):
                continue
            for host in endpoint.addresses or []:
                found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return sorted(set(found))


class EndpointSliceDiscovery:
    """Keeps a router's workers in step with its worker Services' endpoints."""

    def __init__(
        self,
        api: Any,  # kubernetes.client.DiscoveryV1Api
        namespace: str,
        services: dict[Role, str],
        membership: Membership,
        interval_s: float = 2.0,
    ) -> None:
        self.api, self.namespace, self.services = api, namespace, services
        self.membership, self.interval_s = membership, interval_s
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, config: RouterConfig, membership: Membership) -> EndpointSliceDiscovery:
        """In-cluster credentials, or `config.kubeconfig`."""
        from kubernetes import client
        from kubernetes import config as kube_config

        if config.kubeconfig:
            api_client = kube_config.new_client_from_config(config_file=config.kubeconfig)
        else:
            kube_config.load_incluster_config()
            api_client = client.ApiClient()
        services = {
            Role.PREFILL: config.prefill_service,
            Role.DECODE: config.decode_service,
            Role.COLOCATED: config.colocated_service,
        }
        services = {role: name for role, name in services.items() if name}
        return cls(
            client.DiscoveryV1Api(api_client), config.kubernetes_namespace, services, membership,
            config.discovery_interval_s,
        )  # fmt: skip

    async def sync_once(self) -> None:
        """List each Service's slices and sync its role; a failed list changes nothing."""
        for role, service in self.services.items():
            try:
                slices = await asyncio.to_thread(
                    list_service_slices, self.api, self.namespace, service
                )
            except Exception as error:  # the API server's errors are many; keep the last view
                log.warning("cannot list the endpoints of service %s: %s", service, error)
                continue
            await self.membership.sync(role, ready_addresses(slices))

    async def start(self) -> None:
        await self.sync_once()
        self._task = asyncio.create_task(self._run(), name="endpoint-discovery")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sync_once()
            except Exception:
                log.exception("endpoint discovery failed")
