"""Running a Baton cluster. Today: local processes on this machine (`cluster.local`); Ray and
Kubernetes backends will stand beside it with the same `ClusterSpec`."""

from cluster.local import (
    API_KEY_ENV,
    Cluster,
    ClusterSpec,
    WorkerHandle,
    check_kv_transport,
    free_port,
    free_port_run,
    gpu_for_worker,
    kv_transport_args,
    start_cluster,
    start_worker,
)

__all__ = [
    "API_KEY_ENV",
    "Cluster",
    "ClusterSpec",
    "WorkerHandle",
    "check_kv_transport",
    "free_port",
    "free_port_run",
    "gpu_for_worker",
    "kv_transport_args",
    "start_cluster",
    "start_worker",
]
