"""KV connectors by name, as vLLM's `KVConnectorFactory`: the built-in ones, and users' own.

    register_kv_connector("my-store", MyStoreConnector)      # a class or any factory
    connector = make_kv_connector(KVConnectorConfig("my-store", {"path": "/tmp/kv"}), config)
    core = EngineCore(config, connector)

A factory is called as `factory(engine_config, **options)` and returns a `KVConnector`. The
built-in ones are registered by module path and imported only when made.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineConfig
from engine.kv_connector.base import KVConnector

KVConnectorFactory = Callable[..., KVConnector]


# Unlike vLLM's `kv_transfer_config`, this is not a field of EngineConfig: a connector is bound to
# its service's transport and event loop (the push connector announces saves to the prefill
# service's loop), so whoever runs the engine makes it with `make_kv_connector` and installs it
# (`EngineCore(config, connector)`, or `core.set_kv_connector` as an engine command).
@dataclass(frozen=True, slots=True)
class KVConnectorConfig:
    """Which KV connector an engine runs with: a registered `name`, and its own `options`
    (keyword arguments of its factory, e.g. {"layerwise": True} for "push")."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)


_factories: dict[str, KVConnectorFactory | tuple[str, str]] = {
    "push": ("engine.kv_connector.push", "PushConnector"),
    "receive": ("engine.kv_connector.receive", "ReceiveConnector"),
}


def register_kv_connector(name: str, factory: KVConnectorFactory) -> None:
    """Make `factory` available as `name`; ValueError if the name is taken."""
    if name in _factories:
        raise ValueError(f"a KV connector named {name!r} is already registered")
    _factories[name] = factory


def kv_connector_names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_factories)


def make_kv_connector(config: KVConnectorConfig, engine_config: EngineConfig) -> KVConnector:
    """A new connector of `config.name` for an engine configured by `engine_config`;
    ValueError naming the registered ones for an unknown name."""
    factory = _factories.get(config.name)
    if factory is None:
        known = ", ".join(kv_connector_names())
        raise ValueError(f"unknown KV connector {config.name!r} (registered: {known})")
    if isinstance(factory, tuple):
        module, attr = factory
        factory = _factories[config.name] = getattr(importlib.import_module(module), attr)
    connector = factory(engine_config, **config.options)
    connector.name = config.name
    return connector
