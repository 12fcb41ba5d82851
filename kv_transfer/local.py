"""KV transfer inside one process (`local://NAME`): the sender copies straight into the caches.

Receivers register under a name in a process-wide registry when started. The semantics are the
tcp transport's: expect / cancel / deadline, refusal of unexpected ids, layout checks before the
first write, and a send that returns once the receiver's future is resolved.

Sender and receiver may run on different event loops (e.g. prefill and decode workers on their
own threads): every step that touches the receiver (claim, layer write, finish) runs on the
receiver's loop, so its caches are only ever written from its own thread, as `KVReceiver` says.
The sender waits for each step, so the tensors it hands over are not reused under the copy.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from kv_transfer.base import (
    KVLayerSource,
    KVReceiver,
    KVSender,
    KVTransferError,
    TransferSpec,
    check_send,
    layer_ready,
)
from kv_transfer.blocks import check_layer, scatter_layer
from kv_transfer.reservations import Extras, Reservation, ReservationTable

SCHEME = "local://"
_receivers: dict[str, LocalKVReceiver] = {}
_receivers_lock = threading.Lock()

T = TypeVar("T")


class LocalKVReceiver(KVReceiver):
    """Receives in-process transfers into `kv_caches` (one tensor per layer, any device)."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], name: str) -> None:
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        if not name:
            raise ValueError("a local receiver needs a name")
        self.kv_caches = list(kv_caches)
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._table: ReservationTable | None = None

    @property
    def endpoint(self) -> str:
        """`local://NAME`."""
        return SCHEME + self.name

    async def start(self) -> None:
        """Register under `name`; `ValueError` if another started receiver holds it."""
        with _receivers_lock:
            if self.name in _receivers:
                raise ValueError(f"a local KV receiver named {self.name!r} is already started")
            _receivers[self.name] = self
        self.loop = asyncio.get_running_loop()
        self._table = ReservationTable(self.kv_caches[0].shape[1], self.loop)

    def expect(
        self, transfer_id: str, dst_block_ids: Sequence[int], deadline: float
    ) -> asyncio.Future[Extras]:
        """See `KVReceiver.expect`; `RuntimeError` before `start()`."""
        return self._require_table().add(transfer_id, dst_block_ids, deadline)

    def cancel(self, transfer_id: str) -> None:
        """See `KVReceiver.cancel`."""
        if self._table is not None:
            self._table.cancel(transfer_id)

    async def close(self) -> None:
        """Unregister and fail pending reservations."""
        with _receivers_lock:
            if _receivers.get(self.name) is self:
                del _receivers[self.name]
        if self._table is not None:
            self._table.close("receiver closed")

    # The steps below run on the receiver's loop, called by LocalKVSender.

    def open_transfer(
        self,
        transfer_id: str,
        dst_block_ids: Sequence[int],
        num_layers: int,
        shape: Sequence[int],
        dtype: torch.dtype,
    ) -> Reservation:
        """Claim `transfer_id` for layers of `shape`/`dtype`; `KVTransferError` if refused."""
        table = self._require_table()
        res = table.claim(transfer_id)
        try:
            res.check_blocks(dst_block_ids)
            if num_layers != len(self.kv_caches):
                raise KVTransferError(
                    f"transfer {transfer_id!r}: sender has {num_layers} layers, "
                    f"receiver has {len(self.kv_caches)}"
                )
            for i, cache in enumerate(self.kv_caches):
                check_layer(transfer_id, i, cache, shape, dtype, res.block_ids.numel())
        except KVTransferError as exc:
            table.fail(res, exc)
            raise
        return res

    def write_layer(self, res: Reservation, i: int, layer: torch.Tensor) -> None:
        """Copy layer `i` (2, n, block_size, Hkv, D) into the reserved blocks."""
        if not res.live:
            raise KVTransferError(res.end_reason())
        cache = self.kv_caches[i]
        try:
            check_layer(res.transfer_id, i, cache, layer.shape, layer.dtype, res.block_ids.numel())
        except KVTransferError as exc:
            self._require_table().fail(res, exc)
            raise
        scatter_layer(cache, res.block_ids, layer)

    def finish_transfer(self, res: Reservation, extras: Extras) -> None:
        """Resolve the reservation: all layers are written."""
        if not res.live:
            raise KVTransferError(res.end_reason())
        self._require_table().complete(res, extras)

    def abort_transfer(self, res: Reservation, error: KVTransferError) -> None:
        """Fail the reservation (no-op once it is done)."""
        self._require_table().fail(res, error)

    def _require_table(self) -> ReservationTable:
        if self._table is None:
            raise RuntimeError(f"local KV receiver {self.name!r} is not started")
        return self._table


def find_receiver(endpoint: str) -> LocalKVReceiver:
    """The started receiver at `local://NAME`; `KVTransferError` if there is none."""
    if not endpoint.startswith(SCHEME):
        raise KVTransferError(f"not a local endpoint: {endpoint!r}")
    with _receivers_lock:
        receiver = _receivers.get(endpoint[len(SCHEME) :])
    if receiver is None or receiver.loop is None:
        raise KVTransferError(f"no local KV receiver at {endpoint!r}")
    return receiver


async def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on `loop` (directly when it is the running loop) and return its result."""
    if loop is asyncio.get_running_loop():
        return fn(*args)

    async def call() -> T:
        return fn(*args)

    try:
        future = asyncio.run_coroutine_threadsafe(call(), loop)
    except RuntimeError as exc:
        raise KVTransferError("the receiver's event loop is closed") from exc
    return await asyncio.wrap_future(future)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn(*args)` on `loop` without waiting (now when it is the running loop)."""
    if loop is asyncio.get_running_loop():
        fn(*args)
    elif not loop.is_closed():
        loop.call_soon_threadsafe(fn, *args)


class LocalKVSender(KVSender):
    """Sends transfers to `LocalKVReceiver`s of this process."""

    def __init__(self) -> None:
        self._closed = False

    async def send(
        self,
        spec: TransferSpec,
        layers: KVLayerSource,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """See `KVSender.send`; yields to the event loop between layers."""
        left = check_send(self._closed, spec, layers)
        receiver = find_receiver(spec.endpoint)
        try:
            async with asyncio.timeout(left):
                await self._transfer(receiver, spec, layers, extra or {})
        except TimeoutError as exc:
            raise KVTransferError(f"transfer {spec.transfer_id!r}: deadline passed") from exc

    async def close(self) -> None:
        """Refuse new sends (there is nothing else to release)."""
        self._closed = True

    @staticmethod
    async def _transfer(
        receiver: LocalKVReceiver,
        spec: TransferSpec,
        layers: KVLayerSource,
        extras: dict[str, torch.Tensor],
    ) -> None:
        loop = receiver.loop
        assert loop is not None
        first = layers.layer(0)
        res = await _on_loop(
            loop,
            receiver.open_transfer,
            spec.transfer_id,
            spec.dst_block_ids,
            layers.num_layers,
            first.shape,
            first.dtype,
        )
        try:
            for i in range(layers.num_layers):
                await layer_ready(layers, i)
                layer = first if i == 0 else layers.layer(i)
                await _on_loop(loop, receiver.write_layer, res, i, layer)
                await asyncio.sleep(0)  # let cancels, deadlines and other transfers in
            copies = {name: t.detach().clone() for name, t in extras.items()}
            await _on_loop(loop, receiver.finish_transfer, res, copies)
        except BaseException as exc:  # a dead sender must not leave the reservation hanging
            error = KVTransferError(f"transfer {spec.transfer_id!r}: sender failed ({exc!r})")
            _post(loop, receiver.abort_transfer, res, error)
            raise
