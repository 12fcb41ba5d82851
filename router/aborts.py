"""Best-effort Abort RPCs that outlive the (often cancelled) task that asks for them."""

from __future__ import annotations

import asyncio
import logging

import grpc

from proto.baton.v1 import common_pb2
from router.errors import rpc_status
from router.workers import WorkerInfo

log = logging.getLogger(__name__)


class AbortSender:
    """Sends `Abort(request_ids)` to a worker in a background task.

    A client that disconnects cancels the task serving it; the abort must still reach every
    worker involved, so it runs in its own task (kept referenced here until it ends).
    """

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def abort(self, worker: WorkerInfo, request_ids: list[str]) -> None:
        """Ask `worker` to abort `request_ids` (unknown or finished ids are no-ops there)."""
        task = asyncio.get_running_loop().create_task(self._send(worker, request_ids))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Wait for the aborts in flight (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _send(self, worker: WorkerInfo, request_ids: list[str]) -> None:
        try:
            await worker.stub.Abort(
                common_pb2.AbortRequest(request_ids=request_ids), timeout=self.timeout_s
            )
        except grpc.RpcError as error:
            code, details = rpc_status(error)
            log.warning(
                "abort of %s on %s failed: %s %s", request_ids, worker.address, code, details
            )
