"""The KV connector seam: how KV enters or leaves an engine (base), connectors by name
(registry), and the built-in ones: "push" (the prefill role) and "receive" (the decode role)."""

from engine.kv_connector.base import (
    FinishedTransfers,
    KVConnector,
    KVConnectorMetadata,
    KVConnectorScheduler,
    KVConnectorWorker,
    LoadedRequest,
)
from engine.kv_connector.registry import (
    KVConnectorConfig,
    kv_connector_names,
    make_kv_connector,
    register_kv_connector,
)

__all__ = [
    "FinishedTransfers",
    "KVConnector",
    "KVConnectorConfig",
    "KVConnectorMetadata",
    "KVConnectorScheduler",
    "KVConnectorWorker",
    "LoadedRequest",
    "kv_connector_names",
    "make_kv_connector",
    "register_kv_connector",
]
