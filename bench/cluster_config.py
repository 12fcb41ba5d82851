"""Cluster configurations for `baton bench compare`, written as short strings.

    pd:PxD[:OPTION...]         P prefill workers + D decode workers (disaggregated)
    colocated:N[:OPTION...]    N colocated workers (each runs prefill and decode)

OPTION is `key=value` (or a bare flag):

    policy=NAME                the router's routing policy (round_robin, least_loaded,
                               prefix_aware, ...; default: the router's own default)
    name=LABEL                 the label in tables and plots (default: the string itself)
    max-num-seqs=N, max-num-batched-tokens=N, num-kv-blocks=N, kv-cache-memory-bytes=N,
    block-size=N, max-model-len=N, max-num-waiting=N, scheduling-policy=NAME, dtype=NAME,
    seed=N, no-enable-prefix-caching   passed to every worker as --KEY [VALUE]

Examples: `pd:1x1`, `colocated:2`, `pd:1x1:policy=round_robin`,
`colocated:2:no-enable-prefix-caching:name=colocated-nocache`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cluster import ClusterSpec

WORKER_OPTIONS = frozenset({
    "max-num-seqs", "max-num-batched-tokens", "num-kv-blocks", "kv-cache-memory-bytes",
    "block-size", "max-model-len", "max-num-waiting", "scheduling-policy", "dtype", "seed",
})
WORKER_FLAGS = frozenset({"no-enable-prefix-caching"})
DEFAULT_POLICY = ""  # the router's own default (cluster.ClusterSpec's convention)


@dataclass(slots=True)
class ClusterConfig:
    """One configuration to start: worker counts, router policy, extra worker arguments."""

    label: str
    prefill: int = 0
    decode: int = 0
    colocated: int = 0
    policy: str = DEFAULT_POLICY
    worker_args: list[str] = field(default_factory=list)

    def spec(self, model: Path, port: int, grpc_port: int) -> ClusterSpec:
        """The ClusterSpec on 127.0.0.1 at the given ports."""
        return ClusterSpec(
            model=model, prefill=self.prefill, decode=self.decode, colocated=self.colocated,
            port=port, grpc_port=grpc_port, policy=self.policy,
            worker_args=list(self.worker_args),
        )

    def workers_per_role(self) -> int:
        """The most workers of one role: requests sent at once that can reach every worker."""
        return max(self.prefill, self.decode, self.colocated)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def parse_cluster_config(text: str) -> ClusterConfig:
    """Parse `pd:1x1`, `colocated:2:policy=round_robin`, ...; ValueError explains a bad one."""
    kind, _, rest = text.partition(":")
    size, *options = rest.split(":") if rest else [""]
    config = ClusterConfig(label=text)
    if kind == "pd":
        match = re.fullmatch(r"(\d+)x(\d+)", size)
        if not match or "0" in (match[1], match[2]):
            raise ValueError(f"{text!r}: write pd:PxD with P, D >= 1 (e.g. pd:1x1)")
        config.prefill, config.decode = int(match[1]), int(match[2])
    elif kind == "colocated":
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"{text!r}: write colocated:N with N >= 1 (e.g. colocated:2)")
        config.colocated = int(size)
    else:
        raise ValueError(f"{text!r}: a configuration starts with pd:PxD or colocated:N")
    for option in options:
        _apply_option(config, option, text)
    return config


def _apply_option(config: ClusterConfig, option: str, text: str) -> None:
    key, eq, value = option.partition("=")
    if key == "policy" and value:
        config.policy = value
    elif key == "name" and value:
        config.label = value
    elif key in WORKER_OPTIONS and value:
        config.worker_args += [f"--{key}", value]
    elif key in WORKER_FLAGS and not eq:
        config.worker_args.append(f"--{key}")
    else:
        known = ", ".join(sorted({"policy", "name", *WORKER_OPTIONS, *WORKER_FLAGS}))
        raise ValueError(f"{text!r}: unknown or malformed option {option!r} (known: {known})")
