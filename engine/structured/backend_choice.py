"""vLLM's `--structured-outputs-config`: the backend and whether `auto` falls back, as JSON.

    {"backend": "auto" | "xgrammar" | "guidance" | ..., "disable_fallback": true | false}

Both keys are optional; any other key is refused by name. Torch-free, so the CLI checks the
flag as it parses it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from engine.structured.registry import backend_names

CONFIG_KEYS = ("backend", "disable_fallback")


def parse_backend_choice(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """The keys of `value` (a JSON object, or the mapping itself) checked; ValueError naming
    `structured_outputs_config` and the key otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"structured_outputs_config is not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"structured_outputs_config must be a JSON object, got {value!r}")
    unknown = [key for key in value if key not in CONFIG_KEYS]
    if unknown:
        raise ValueError(
            f"structured_outputs_config: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(CONFIG_KEYS)}"
        )
    backend = value.get("backend", "auto")
    if backend not in backend_names():
        raise ValueError(
            f"structured_outputs_config.backend must be one of {', '.join(backend_names())}, "
            f"got {backend!r}"
        )
    if not isinstance(value.get("disable_fallback", False), bool):
        raise ValueError(
            "structured_outputs_config.disable_fallback must be true or false, "
            f"got {value['disable_fallback']!r}"
        )
    return dict(value)
