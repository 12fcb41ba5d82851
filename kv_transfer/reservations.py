"""A receiver's reservations: which transfer may write which blocks, until when.

Shared by every `KVReceiver`. A reservation's life::

    add() -> pending --claim()--> receiving --complete()--> future resolved
               |                      |
               +-- cancel(), deadline, fail(), close(), owner cancels the future --> future done

A done future ends the reservation whatever ended it: it leaves the table and transports check
`Reservation.live` right before every cache write, so nothing is written after that, except
GPU writes a transport queued before (nccl), which `KVReceiver.release` waits for.
Everything here runs on the receiver's event loop thread.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kv_transfer.base import KVTransferError

Extras = dict[str, torch.Tensor]


@dataclass(eq=False, slots=True)
class Reservation:
    """Blocks reserved for one transfer: `block_ids` (n,) int64, until `deadline` (time.time())."""

    transfer_id: str
    block_ids: torch.Tensor
    deadline: float
    future: asyncio.Future[Extras]
    claimed: bool = False

    @property
    def live(self) -> bool:
        """True while the transfer may still write its blocks."""
        return not self.future.done()

    def check_blocks(self, dst_block_ids: Sequence[int]) -> None:
        """`KVTransferError` unless the sender's `dst_block_ids` are this reservation's."""
        if tuple(dst_block_ids) != tuple(self.block_ids.tolist()):
            raise KVTransferError(
                f"transfer {self.transfer_id!r}: sender targets blocks {list(dst_block_ids)}, "
                f"the reservation holds {self.block_ids.tolist()}"
            )

    def end_reason(self) -> str:
        """Why the future is done, for error messages to the sender."""
        if self.future.cancelled():
            return f"transfer {self.transfer_id!r} was cancelled by the receiver"
        exc = self.future.exception()
        return str(exc) if exc is not None else f"transfer {self.transfer_id!r} already finished"


class ReservationTable:
    """Pending reservations by transfer id, each with a deadline timer on `loop`."""

    def __init__(self, num_blocks: int, loop: asyncio.AbstractEventLoop) -> None:
        self._num_blocks = num_blocks
        self._loop = loop
        self._pending: dict[str, Reservation] = {}

    def add(
        self, transfer_id: str, block_ids: Sequence[int], deadline: float
    ) -> asyncio.Future[Extras]:
        """Register a reservation; see `KVReceiver.expect`."""
        old = self._pending.get(transfer_id)
        if old is not None and old.live:
            raise ValueError(f"transfer {transfer_id!r} is already expected")
        index = self._check_blocks(block_ids)
        future: asyncio.Future[Extras] = self._loop.create_future()
        res = Reservation(transfer_id, index, deadline, future)
        timer = self._loop.call_later(max(0.0, deadline - time.time()), self._expire, res)
        future.add_done_callback(lambda _: self._forget(res, timer))
        self._pending[transfer_id] = res
        return future

    def claim(self, transfer_id: str) -> Reservation:
        """Hand the reservation to an incoming transfer; `KVTransferError` if it may not write."""
        res = self._pending.get(transfer_id)
        if res is None or not res.live:
            raise KVTransferError(
                f"transfer {transfer_id!r} is not expected (unknown, expired, cancelled or done)"
            )
        if res.claimed:
            raise KVTransferError(f"transfer {transfer_id!r} is already being received")
        if time.time() >= res.deadline:
            self._expire(res)
            raise KVTransferError(res.end_reason())
        res.claimed = True
        return res

    def complete(self, res: Reservation, extras: Extras) -> None:
        """Resolve the reservation's future with `extras`: its blocks hold the transfer's KV."""
        if res.live:
            res.future.set_result(extras)

    def fail(self, res: Reservation, error: KVTransferError) -> None:
        """Fail the reservation's future with `error` (no-op if it is already done)."""
        if res.live:
            res.future.set_exception(error)

    def cancel(self, transfer_id: str) -> None:
        """Drop a reservation: its future is cancelled and a later transfer is refused."""
        res = self._pending.pop(transfer_id, None)
        if res is not None:
            res.future.cancel()

    def close(self, reason: str) -> None:
        """Fail every pending reservation with `KVTransferError(reason)`."""
        for res in list(self._pending.values()):
            self.fail(res, KVTransferError(f"transfer {res.transfer_id!r}: {reason}"))
        self._pending.clear()

    def _check_blocks(self, block_ids: Sequence[int]) -> torch.Tensor:
        ids = [int(b) for b in block_ids]
        if ids and (min(ids) < 0 or max(ids) >= self._num_blocks):
            raise ValueError(f"block ids out of range [0, {self._num_blocks}): {ids}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"block ids must be distinct: {ids}")
        return torch.tensor(ids, dtype=torch.long)

    def _expire(self, res: Reservation) -> None:
        self.fail(res, KVTransferError(f"transfer {res.transfer_id!r} missed its deadline"))

    def _forget(self, res: Reservation, timer: asyncio.TimerHandle) -> None:
        timer.cancel()
        if not res.future.cancelled():
            res.future.exception()  # failures are routine (leases lapse): no "never retrieved" log
        if self._pending.get(res.transfer_id) is res:
            del self._pending[res.transfer_id]
