"""A CUDA IPC sender in its own process (CUDA IPC maps memory of another process only), driven by
tests/gpu/test_cuda_ipc_transfer.py, which holds the receiver::

    python -m tests.gpu.ipc_sender ENDPOINT SCENARIO [DTYPE]

It sends the scenario's transfers from `source_caches(DTYPE)` on cuda:0 and prints one JSON line
per event: `{"sent": id, "error": null | message}` after each send, `{"at": i}` when a
layer-wise source reaches layer i where the scenario pauses.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from kv_transfer import KVTransferError, TransferSpec, gather_blocks
from tests.test_kv_transfer import SRC_IDS, make_caches

DEVICE = torch.device("cuda:0")
NUM_LAYERS, HEAD_DIM = 4, 64
EXTRA = torch.arange(6.0).reshape(2, 3)
TTL_S = 30.0


def source_caches(dtype: torch.dtype) -> list[torch.Tensor]:
    return [c.to(DEVICE) for c in make_caches(dtype, 0, num_layers=NUM_LAYERS, head_dim=HEAD_DIM)]


def receiver_caches(dtype: torch.dtype) -> list[torch.Tensor]:
    return [c.to(DEVICE) for c in make_caches(dtype, 1, num_layers=NUM_LAYERS, head_dim=HEAD_DIM)]


class Layerwise:
    """A layer source that makes the sender wait per layer, as a layer-wise export does:
    `hook(i)` (sync or async) runs in `ready(i)`."""

    def __init__(self, inner: Any, hook: Callable[[int], Any]) -> None:
        self._inner, self._hook = inner, hook

    @property
    def num_layers(self) -> int:
        return int(self._inner.num_layers)

    def layer(self, i: int) -> torch.Tensor:
        return self._inner.layer(i)

    async def ready(self, i: int) -> None:
        result = self._hook(i)
        if asyncio.iscoroutine(result):
            await result


def say(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


async def pause_at(i: int, layer: int, seconds: float) -> None:
    if i == layer:
        say({"at": i})
        await asyncio.sleep(seconds)


def die_at(i: int, layer: int) -> None:
    if i == layer:
        os._exit(3)


# scenario -> the sends: (transfer id, src ids, dst ids, extras?, hook or None)
SCENARIOS: dict[str, list[tuple[str, tuple[int, ...], tuple[int, ...], bool, Any]]] = {
    "land": [
        ("t1", SRC_IDS, (3, 9, 0, 14), True, None),
        ("t2", (1, 4), (5, 6), False, None),
        ("t3", (0, 3, 8), (7, 8, 10), False, lambda i: asyncio.sleep(0.01)),
    ],
    "refusals": [
        ("unknown", SRC_IDS, (3, 9, 0, 14), False, None),
        ("wrong-blocks", SRC_IDS, (3, 9, 0, 14), False, None),
        ("out-of-range", SRC_IDS, (3, 9, 0, 999), False, None),
        ("gone", SRC_IDS, (3, 9, 0, 14), False, lambda i: asyncio.sleep(0.01)),
        ("ok", SRC_IDS, (3, 9, 0, 14), False, None),
    ],
    "stall": [
        ("c", SRC_IDS, (3, 9, 0, 14), False, lambda i: pause_at(i, 2, 1.0)),
        ("after", (1, 4), (5, 6), False, None),
    ],
    "die": [("dying", SRC_IDS, (3, 9, 0, 14), False, lambda i: die_at(i, 1))],
    "one": [("next", SRC_IDS, (3, 9, 0, 14), False, None)],
}


async def main(endpoint: str, scenario: str, dtype: torch.dtype) -> None:
    from kv_transfer.cuda_ipc import CudaIpcKVSender

    src = source_caches(dtype)
    sender = CudaIpcKVSender(DEVICE)
    try:
        for tid, src_ids, dst_ids, extras, hook in SCENARIOS[scenario]:
            source: Any = gather_blocks(src, src_ids)
            if hook is not None:
                source = Layerwise(source, hook)
            spec = TransferSpec(tid, endpoint, dst_ids, time.time() + TTL_S)
            try:
                await sender.send(spec, source, {"hidden": EXTRA} if extras else None)
                say({"sent": tid, "error": None})
            except KVTransferError as exc:
                say({"sent": tid, "error": str(exc)})
    finally:
        await sender.close()


if __name__ == "__main__":
    dtype = getattr(torch, sys.argv[3]) if len(sys.argv) > 3 else torch.bfloat16
    asyncio.run(main(sys.argv[1], sys.argv[2], dtype))
