"""The prefix index's two faces: routers read it, workers' publishers write it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from proto.baton.v1 import kv_events_pb2


class IndexUnavailableError(RuntimeError):
    """The index's store cannot be reached; callers fall back (routing by load only)."""


class PrefixIndex(ABC):
    """What a router asks: for a prompt's block hashes, which live workers hold how much."""

    @abstractmethod
    async def match(self, block_hashes: Sequence[int]) -> dict[str, int]:
        """`{worker_id: number of leading blocks of block_hashes it holds}` for every live worker
        holding at least the first block. Stops at the first block no worker holds. Entries of
        a worker whose heartbeat lapsed or whose epoch changed are never returned."""

    @abstractmethod
    async def drop_worker(self, worker_id: str) -> None:
        """Forget everything about a worker (it left the cluster)."""

    async def collect_lapsed(self) -> int:
        """Delete the entries of every worker whose heartbeat lapsed; return how many workers
        went. Safe from any number of processes at once (a lapsed worker that comes back is
        asked for a snapshot, as after a restart)."""
        return 0

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections."""


class IndexWriter(ABC):
    """Where a worker's publisher sends its batches."""

    @abstractmethod
    async def apply(self, batch: kv_events_pb2.KVEventBatch) -> bool:
        """Apply one batch; True when the index needs a snapshot from this worker (a gap, an
        unknown epoch). Raises IndexUnavailableError when the store cannot be reached."""

    @abstractmethod
    async def retire(self, worker_id: str, epoch: str) -> None:
        """The worker leaves cleanly: delete its entries (those of `epoch` only, so a newer
        process under the same id keeps its own). Raises IndexUnavailableError."""

    async def collect_lapsed(self) -> int:
        """As `PrefixIndex.collect_lapsed`, where the store allows a writer to do it."""
        return 0

    async def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release connections."""
