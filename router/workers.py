"""What the router knows about one worker: address, role, health, last load, its stubs."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import grpc

from proto.baton.v1 import common_pb2, worker_pb2_grpc


class Role(enum.StrEnum):
    """A worker's job, as `Load.role` spells it."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


_STUBS: dict[Role, Any] = {
    Role.PREFILL: worker_pb2_grpc.PrefillWorkerStub,
    Role.DECODE: worker_pb2_grpc.DecodeWorkerStub,
    Role.COLOCATED: worker_pb2_grpc.ColocatedWorkerStub,
}


@dataclass(eq=False)
class WorkerInfo:
    """One worker as the router sees it.

    `load` is the latest `GetLoad` answer (None until the first). `healthy` is False until the
    worker answers both health and load, and again whenever it stops answering.
    `assigned_since_poll` counts requests routed here since `load` was read, so a burst of
    requests between two polls does not all pick the same "least loaded" worker.
    A `draining` worker gets no new requests (it is leaving); `inflight` counts this router's
    calls to it that have not ended, and `quiet_polls` the polls since it began draining that
    found it idle (nothing in flight here, nothing running, waiting or reserved there).
    """

    address: str
    role: Role
    channel: grpc.aio.Channel
    stub: Any  # PrefillWorkerStub, DecodeWorkerStub or ColocatedWorkerStub, by role
    healthy: bool = False
    load: common_pb2.Load | None = None
    last_error: str = ""
    assigned_since_poll: int = 0
    draining: bool = False
    inflight: int = 0
    quiet_polls: int = 0

    @classmethod
    def connect(cls, address: str, role: Role) -> WorkerInfo:
        """A WorkerInfo with a fresh (lazily connecting) channel to `address`."""
        channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.enable_retries", 0),
            ],
        )
        worker = cls(address, role, channel, None)
        worker.stub = _CountingStub(_STUBS[role](channel), worker)
        return worker

    @property
    def is_idle(self) -> bool:
        """Nothing of this router's in flight here, and (per its latest load) nothing running,
        waiting or reserved on the worker."""
        load = self.load
        busy = load is not None and (load.num_running or load.num_waiting or load.num_reserved)
        return self.inflight == 0 and not busy

    @property
    def num_queued(self) -> int:
        """Requests this worker holds or will soon hold: waiting + running (+ just routed)."""
        load = self.load
        polled = load.num_waiting + load.num_running if load is not None else 0
        return polled + self.assigned_since_poll

    @property
    def num_used_blocks(self) -> int:
        """KV blocks in use (total - free), 0 before the first load poll."""
        load = self.load
        return load.num_total_blocks - load.num_free_blocks if load is not None else 0

    @property
    def block_size(self) -> int | None:
        """Tokens per KV block, once known."""
        return self.load.block_size if self.load is not None and self.load.block_size else None

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else f"unhealthy ({self.last_error or 'not polled'})"
        return f"WorkerInfo({self.role} {self.address}, {state}{', draining' * self.draining})"


class _CountingStub:
    """A worker's stub that counts its calls in flight on `worker.inflight` (load polls
    aside), so a draining worker is known to be idle before it is dropped."""

    def __init__(self, stub: Any, worker: WorkerInfo) -> None:
        self._stub, self._worker = stub, worker

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        if name == "GetLoad":
            return method

        def counted(*args: Any, **kwargs: Any) -> Any:
            call = method(*args, **kwargs)
            self._worker.inflight += 1
            call.add_done_callback(self._ended)
            return call

        return counted

    def _ended(self, _call: Any) -> None:
        self._worker.inflight -= 1
