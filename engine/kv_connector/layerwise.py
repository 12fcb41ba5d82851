"""Exporting a prompt's KV layer by layer while the prefill computes it (the push connector).

With layer-wise saves on (engine.kv_connector.push), the step that runs a handed-off request's
last prompt chunk copies each layer's blocks into a buffer of the export right after that layer's
forward pass (`KVConnectorWorker.save_kv_layer`), so a KV sender can ship layer L while layer L+1
is computed::

    engine thread:  layer 0 fwd -> capture(0) -> layer 1 fwd -> capture(1) -> ... -> sample
    sender (loop):          await ready(0) -> send layer 0 -> await ready(1) -> send layer 1 ...

`ready(i)` resolves once the copy of layer i is *enqueued*. On a GPU the copy itself may still be
running: `event(i)` is a CUDA event recorded after it, which a sender's stream waits on (a CPU
copy is done when enqueued, and `event(i)` is None). `layer(i)` may be called any time: its
buffer is allocated up front, so the sender learns shapes before the data exists. If the forward
pass fails, the connector `cancel()`s the export (`step_failed`) and waiters fail with
`ExportCancelled`.

The object is a `kv_transfer.KVLayerSource` with the optional `ready`/`event` extras.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import torch


class ExportCancelled(RuntimeError):
    """The step that was filling the export failed: its layers will never all be ready."""


class LayerwiseExport:
    """Per-layer copies of `block_ids` out of `kv_caches`, filled as the forward pass runs."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
        first = kv_caches[0]
        self._index = torch.tensor(list(block_ids), dtype=torch.long, device=first.device)
        shape = (2, len(block_ids), *first.shape[2:])  # (2, n, block_size, Hkv, D)
        self._buffers = [torch.empty(shape, dtype=c.dtype, device=c.device) for c in kv_caches]
        self._events: list[torch.cuda.Event | None] = [None] * len(kv_caches)
        self._lock = threading.Lock()
        self._num_ready = 0
        self._cancelled = False
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    @property
    def num_layers(self) -> int:
        return len(self._buffers)

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's buffer, (2, n, block_size, Hkv, D); its data is valid once `ready(i)`."""
        return self._buffers[i]

    def event(self, i: int) -> torch.cuda.Event | None:
        """The CUDA event after layer i's copy (valid once `ready(i)`); None on CPU."""
        return self._events[i]

    def capture(self, i: int, cache: torch.Tensor) -> None:
        """Engine thread, right after layer i's forward pass: copy its blocks out of `cache`."""
        torch.index_select(cache, 1, self._index, out=self._buffers[i])
        if cache.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(cache.device))
            self._events[i] = event
        with self._lock:
            self._num_ready = i + 1
            due = [w for w in self._waiters if w[0] <= i]
            self._waiters = [w for w in self._waiters if w[0] > i]
        for _, loop, future in due:
            loop.call_soon_threadsafe(_resolve, future)

    def cancel(self) -> None:
        """The forward pass failed: fail every waiter, now and later (any thread)."""
        with self._lock:
            self._cancelled = True
            due, self._waiters = self._waiters, []
        for _, loop, future in due:
            loop.call_soon_threadsafe(_fail, future)

    async def ready(self, i: int) -> None:
        """Returns once layer i's copy is enqueued; `ExportCancelled` if it never will be."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._num_ready > i:
                return
            if self._cancelled:
                raise ExportCancelled("the step computing this KV failed")
            future: asyncio.Future[None] = loop.create_future()
            self._waiters.append((i, loop, future))
        await future


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(ExportCancelled("the step computing this KV failed"))
