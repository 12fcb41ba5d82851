"""The two-process KV transfer timing harness (bench.kv_transfer_pair), over TCP on the CPU; the
GPU benchmark runs the same harness over NCCL."""

from __future__ import annotations

import asyncio

import torch

from bench.kv_transfer_pair import RemoteReceiver, time_transfers
from kv_transfer import TcpKVSender

SHAPE = (3, 32, 4, 2, 8)  # layers, blocks, block_size, kv heads, head_dim


def test_timed_transfers_land_in_another_process():
    num_layers, num_blocks, *rest = SHAPE
    gen = torch.Generator().manual_seed(0)
    src = [torch.randn((2, num_blocks, *rest), generator=gen) for _ in range(num_layers)]

    async def main() -> list[float]:
        sender = TcpKVSender()
        try:
            async with RemoteReceiver("tcp", "cpu", "float32", SHAPE) as receiver:
                assert receiver.endpoint.startswith("tcp://")
                return await time_transfers(sender, receiver, src, 6, repeats=3, warmup=1)
        finally:
            await sender.close()

    times = asyncio.run(asyncio.wait_for(main(), 120))
    assert len(times) == 3 and all(t > 0 for t in times)
