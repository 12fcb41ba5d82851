"""The KV-transfer interface: one sender/receiver pair per transport (tcp, local, later nccl).

A transfer moves the KV of one prompt's blocks from a prefill worker's paged cache into blocks a
decode worker reserved for it::

    decode worker                    router                       prefill worker
    receiver.expect(id, dst, t) ---> TransferSpec(id, endpoint, dst, t) ---> sender.send(spec, src)
    future resolves <--------------- layer 0, layer 1, ..., extras <------------ (ack returns send)

Data moves one layer at a time: `KVLayerSource.layer(i)` is pulled only when layer `i` is due, and
a source may make senders wait for each layer (`layer_ready`, `layer_event`), so a sender can ship
layer L while layer L+1 is still being computed (engine.kv_connector.layerwise). Every layer
tensor has the cache layout of `engine.attention`, restricted to the sent blocks::

    layer: (2, num_blocks_sent, block_size, num_kv_heads, head_dim)   0 = keys, 1 = values

`extra` tensors (e.g. the last hidden state, for speculative decoding) travel after the layers
and come out of the receiver's future by name.

Times are wall-clock seconds since the epoch (`time.time()`), so a deadline means the same on
every host of the cluster (clocks are assumed NTP-synchronised to well under a lease).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


class KVTransferError(RuntimeError):
    """A transfer failed: refused, malformed, cut short, cancelled or past its deadline.

    Both sides see it: the sender's `send` raises it and the receiver's future fails with it.
    """


class TransferRefused(KVTransferError):
    """The receiver refused or dropped a transfer cleanly: the sender's connection to it (and
    whatever pairs them, such as an NCCL communicator) stays in step and usable."""


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """What the decode side reserved; travels router -> prefill worker.

    `endpoint` is the receiver's transport address (`tcp://host:port`, `local://name`);
    `dst_block_ids` are the decode worker's block ids to fill, in the order of the sent blocks;
    `deadline` is the `time.time()` (seconds) after which the receiver drops the reservation.
    """

    transfer_id: str
    endpoint: str
    dst_block_ids: tuple[int, ...]
    deadline: float

    def seconds_left(self) -> float:
        """Seconds until `deadline` (negative once it has passed)."""
        return self.deadline - time.time()


class KVLayerSource(Protocol):
    """The sender's view of the KV to send, pulled one layer at a time."""

    @property
    def num_layers(self) -> int:
        """Number of layers; `layer(i)` is valid for `0 <= i < num_layers`."""
        ...

    def layer(self, i: int) -> torch.Tensor:
        """Layer `i`'s KV of the sent blocks: (2, num_blocks_sent, block_size, Hkv, D).

        Every layer has the same shape and dtype. The tcp sender moves it to CPU if needed.
        """
        ...


async def layer_ready(layers: KVLayerSource, i: int) -> None:
    """Wait until layer `i` of `layers` may be read. A source filled while the prefill runs
    (engine.kv_connector.layerwise.LayerwiseExport) has an async `ready(i)`; others are ready at
    once."""
    ready = getattr(layers, "ready", None)
    if ready is not None:
        await ready(i)


def layer_event(layers: KVLayerSource, i: int) -> torch.cuda.Event | None:
    """The CUDA event after which layer `i`'s data is valid on the GPU, if the source has one
    (valid once `layer_ready`); None: the data is valid as of the producer's current stream."""
    event = getattr(layers, "event", None)
    return event(i) if event is not None else None


class KVSender(ABC):
    """Pushes KV blocks into a remote (or local) receiver's reserved blocks."""

    @abstractmethod
    async def send(
        self,
        spec: TransferSpec,
        layers: KVLayerSource,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Send every layer of `layers` (the source blocks, in `spec.dst_block_ids` order).

        The receiver refuses a transfer whose `spec.dst_block_ids` are not exactly its reservation.

        Returns once the receiver has written all of it into its caches and resolved its future.
        Raises `KVTransferError` when the receiver refuses or fails the transfer, the connection
        breaks, or `spec.deadline` passes; never waits past `spec.deadline`. Exceptions raised by
        `layers.layer(i)` itself propagate unchanged (the receiver's reservation then fails).
        """

    @abstractmethod
    async def close(self) -> None:
        """Release the sender's resources; sends still in flight fail with `KVTransferError`."""


class KVReceiver(ABC):
    """Receives transfers into a decode worker's KV caches, at blocks reserved beforehand.

    `expect` and `cancel` are called on the event loop that ran `start()`; receivers write cache
    blocks from that same loop's thread. Blocks reserved for a transfer belong to it alone until
    its future is done (the engine neither reads nor writes them meanwhile), so writing them while
    the engine steps other requests' blocks is safe. Nothing is written into a reservation's
    blocks after its future is done, whatever ended it.
    """

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """This receiver's address for `TransferSpec.endpoint`; known once `start()` returned."""

    @abstractmethod
    async def start(self) -> None:
        """Begin accepting transfers (bind the socket, register the name, ...)."""

    @abstractmethod
    def expect(
        self, transfer_id: str, dst_block_ids: Sequence[int], deadline: float
    ) -> asyncio.Future[dict[str, torch.Tensor]]:
        """Reserve `dst_block_ids` for transfer `transfer_id` until `deadline` (`time.time()` s).

        The future resolves with the transfer's `extra` tensors once every layer has been written
        into the caches at `dst_block_ids`; it fails with `KVTransferError` on a refused, short,
        malformed or late transfer (at `deadline` at the latest), and is cancelled by `cancel`.
        Cancelling the future yourself is the same as `cancel(transfer_id)`.
        Raises `ValueError` for a transfer id already pending or block ids that are repeated or
        out of range.
        """

    @abstractmethod
    def cancel(self, transfer_id: str) -> None:
        """Drop a reservation (lease expired, request aborted); a later send for it is refused.

        No-op for an unknown or finished transfer id.
        """

    async def release(self, transfer_id: str) -> None:
        """`cancel(transfer_id)`, then wait until nothing can write its blocks any more: only
        then may the caller give them to another request. A transport that queues GPU writes
        before the data arrived (nccl) waits here for the ones still in flight; the others
        write only while the future is pending, so this is `cancel`."""
        self.cancel(transfer_id)

    @abstractmethod
    async def close(self) -> None:
        """Stop accepting transfers; pending reservations fail with `KVTransferError`."""


def check_send(closed: bool, spec: TransferSpec, layers: KVLayerSource) -> float:
    """The checks every sender makes before sending; returns the seconds left to `deadline`."""
    if closed:
        raise KVTransferError("sender is closed")
    if layers.num_layers < 1:
        raise KVTransferError(f"transfer {spec.transfer_id!r}: no layers to send")
    left = spec.seconds_left()
    if left <= 0:
        raise KVTransferError(f"transfer {spec.transfer_id!r}: deadline passed before send")
    return left
