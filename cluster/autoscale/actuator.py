"""Actuators: what applies the autoscaler's decisions to a cluster.

An actuator counts each role's replicas and sets them, one step at a time. Scaling down drains
first: the replica leaving stops getting new requests and finishes its in-flight ones before it
stops. Actuators register by name in `ACTUATORS` (as routing policies do in
`router.policies.POLICIES`), so a deployment can bring its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

ROLES = ("prefill", "decode")


@dataclass(frozen=True, slots=True)
class Replicas:
    """One role's replicas: `actual` counts every replica asked for (running, starting or
    pending), `pending` those asked for but not serving yet."""

    actual: int
    pending: int = 0


class Actuator(ABC):
    """Counts and sets the replicas of the "prefill" and "decode" roles."""

    @abstractmethod
    def replicas(self, role: str) -> Replicas:
        """The role's replicas right now."""

    @abstractmethod
    def scale(self, role: str, replicas: int) -> None:
        """Ask for `replicas` of `role` (one more or one fewer than now). A replica that goes
        is drained first; the call may return before it is gone, but `replicas()` no longer
        counts it."""

    def worker_metrics_urls(self) -> list[str]:
        """The /metrics URLs of the running workers (the collector scrapes them)."""
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the actuator holds (threads, clients)."""


ACTUATORS: dict[str, Callable[..., Actuator]] = {}


def register_actuator(name: str) -> Callable[[Callable[..., Actuator]], Callable[..., Actuator]]:
    """Class decorator: make an actuator available under `name`."""

    def add(factory: Callable[..., Actuator]) -> Callable[..., Actuator]:
        ACTUATORS[name] = factory
        return factory

    return add
