"""The nccl KV transport between two GPUs: exact landing, refusals that keep the pair usable,
a reservation cancelled mid-flight (`release` waits for the queued writes), and a sender that
dies mid-transfer (the receiver gives up, aborts, and serves the next one)."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time

import pytest
import torch

from kv_transfer import KVTransferError, TransferSpec, gather_blocks
from tests.gpu.ipc_sender import Layerwise
from tests.test_kv_transfer import (
    DST_IDS,
    SRC_IDS,
    expect_failure,
    make_caches,
    other_blocks,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

SRC, DST = torch.device("cuda:0"), torch.device("cuda:1")


def run(coro, timeout_s: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def caches_on(device: torch.device, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    return [c.to(device) for c in make_caches(dtype, seed, num_layers=4, head_dim=64)]


def assert_landed(dst, before, src, src_ids=SRC_IDS, dst_ids=DST_IDS) -> None:
    rest = other_blocks(dst_ids)
    for d, b, s in zip(dst, before, src, strict=True):
        d, b, s = d.cpu(), b.cpu(), s.cpu()
        assert torch.equal(d[:, list(dst_ids)], s[:, list(src_ids)])
        assert torch.equal(d[:, rest], b[:, rest])


def assert_untouched_outside(dst, before, dst_ids=DST_IDS) -> None:
    rest = other_blocks(dst_ids)
    for d, b in zip(dst, before, strict=True):
        assert torch.equal(d.cpu()[:, rest], b.cpu()[:, rest])


def spec_for(receiver, transfer_id: str, dst_ids=DST_IDS, ttl_s: float = 20.0) -> TransferSpec:
    return TransferSpec(transfer_id, receiver.endpoint, tuple(dst_ids), time.time() + ttl_s)


async def send_and_land(sender, receiver, transfer_id: str, src, dst, before) -> None:
    """One transfer of SRC_IDS into DST_IDS that must land exactly (the pair still works)."""
    spec = spec_for(receiver, transfer_id)
    future = receiver.expect(transfer_id, spec.dst_block_ids, spec.deadline)
    await sender.send(spec, gather_blocks(src, SRC_IDS))
    await future
    assert_landed(dst, before, src)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("staging_bytes", [1, 256 << 20], ids=["chunk-per-layer", "one-chunk"])
def test_transfers_land_exactly_and_reuse_the_pair(dtype, staging_bytes):
    from kv_transfer.nccl import NcclKVReceiver, NcclKVSender

    src, dst = caches_on(SRC, dtype, 0), caches_on(DST, dtype, 1)
    before = [c.clone() for c in dst]

    async def main():
        receiver = NcclKVReceiver(dst, staging_bytes=staging_bytes)
        sender = NcclKVSender(SRC)
        await receiver.start()
        assert receiver.endpoint.startswith("nccl://")
        try:
            extra = {"hidden": torch.arange(6.0).reshape(2, 3)}
            spec = spec_for(receiver, "t1")
            future = receiver.expect("t1", spec.dst_block_ids, spec.deadline)
            await sender.send(spec, gather_blocks(src, SRC_IDS), extra)
            got = await future
            assert torch.equal(got["hidden"], extra["hidden"])
            assert_landed(dst, before, src)
            # The same pair again (one communicator), other blocks.
            ids2, dst2 = (1, 4), (5, 6)
            spec = spec_for(receiver, "t2", dst2)
            future = receiver.expect("t2", dst2, spec.deadline)
            await sender.send(spec, gather_blocks(src, ids2))
            await future
            for d, s in zip(dst, src, strict=True):
                assert torch.equal(d[:, list(dst2)].cpu(), s[:, list(ids2)].cpu())
        finally:
            await sender.close()
            await receiver.close()

    run(main())


def test_refusals_keep_the_pair_usable():
    from kv_transfer.nccl import NcclKVReceiver, NcclKVSender

    src, dst = caches_on(SRC, torch.bfloat16, 0), caches_on(DST, torch.bfloat16, 1)
    before = [c.clone() for c in dst]

    async def main():
        receiver, sender = NcclKVReceiver(dst), NcclKVSender(SRC)
        await receiver.start()
        try:
            with pytest.raises(KVTransferError, match="not expected"):
                await sender.send(spec_for(receiver, "unknown"), gather_blocks(src, SRC_IDS))
            spec = spec_for(receiver, "wrong-blocks")
            future = receiver.expect("wrong-blocks", (1, 15, 6, 8), spec.deadline)
            with pytest.raises(KVTransferError, match="reservation holds"):
                await sender.send(spec, gather_blocks(src, SRC_IDS))
            await expect_failure(future)
            with pytest.raises(KVTransferError, match="not expected"):  # refused mid-layers
                await sender.send(
                    spec_for(receiver, "gone"),
                    Layerwise(gather_blocks(src, SRC_IDS), lambda i: asyncio.sleep(0.01)),
                )
            assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(dst, before, strict=True))
            await send_and_land(sender, receiver, "ok", src, dst, before)
        finally:
            await sender.close()
            await receiver.close()

    run(main())


def test_a_failing_layer_source_fails_both_sides_and_the_next_transfer_works():
    from kv_transfer.nccl import NcclKVReceiver, NcclKVSender

    src, dst = caches_on(SRC, torch.bfloat16, 0), caches_on(DST, torch.bfloat16, 1)
    before = [c.clone() for c in dst]

    def boom(i: int) -> None:
        if i == 2:
            raise RuntimeError("layer 2 could not be read")

    async def main():
        receiver, sender = NcclKVReceiver(dst), NcclKVSender(SRC)
        await receiver.start()
        try:
            spec = spec_for(receiver, "t1", ttl_s=3.0)
            future = receiver.expect("t1", spec.dst_block_ids, spec.deadline)
            with pytest.raises(RuntimeError, match="layer 2"):  # layers 0 and 1 were sent
                await sender.send(spec, Layerwise(gather_blocks(src, SRC_IDS), boom))
            await expect_failure(future, within_s=10.0)
            await receiver.release("t1")  # the aborted transfer's queued writes are done
            assert_untouched_outside(dst, before)
            await send_and_land(sender, receiver, "t2", src, dst, before)  # a new communicator
        finally:
            await sender.close()
            await receiver.close()

    run(main())


_DYING_SENDER = textwrap.dedent(
    """
    import asyncio, os, sys, time
    import torch
    from kv_transfer import TransferSpec, gather_blocks
    from kv_transfer.nccl import NcclKVSender
    from tests.gpu.test_nccl_transfer import SRC_IDS, caches_on
    from tests.gpu.test_nccl_transfer import Layerwise

    endpoint, deadline = sys.argv[1], float(sys.argv[2])
    src = caches_on(torch.device("cuda:0"), torch.bfloat16, 0)

    def die(i):
        if i == 1:  # layer 0 went; the receiver waits for NCCL data that never comes
            os._exit(3)

    spec = TransferSpec("dying", endpoint, (3, 9, 0, 14), deadline)
    asyncio.run(NcclKVSender("cuda:0").send(spec, Layerwise(gather_blocks(src, SRC_IDS), die)))
    """
)


def test_sender_dying_mid_transfer_does_not_hang_the_receiver():
    """The receiver sees the control connection close, fails the reservation, aborts the
    communicator (its queued writes then finish), and a new sender gets a new one."""
    from kv_transfer.nccl import NcclKVReceiver, NcclKVSender

    dst = caches_on(DST, torch.bfloat16, 1)
    before = [c.clone() for c in dst]

    async def main():
        receiver = NcclKVReceiver(dst)
        await receiver.start()
        try:
            deadline = time.time() + 20.0
            future = receiver.expect("dying", DST_IDS, deadline)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _DYING_SENDER, receiver.endpoint, str(deadline)
            )
            assert await proc.wait() == 3
            await expect_failure(future, within_s=10.0)
            await receiver.release("dying")  # what the decode worker does before freeing blocks
            assert_untouched_outside(dst, before)
            src = caches_on(SRC, torch.bfloat16, 0)
            sender = NcclKVSender(SRC)
            try:
                spec = spec_for(receiver, "next")
                nxt = receiver.expect("next", spec.dst_block_ids, spec.deadline)
                await sender.send(spec, gather_blocks(src, SRC_IDS))
                await nxt
            finally:
                await sender.close()
            assert_landed(dst, before, src)
        finally:
            await receiver.close()

    run(main(), timeout_s=120.0)


def test_a_reservation_cancelled_mid_flight_is_released_once_its_writes_landed():
    """Cancel while layers are on the way: `release` returns only after the transfer's queued
    GPU work finished, the sender hears the refusal, and the pair carries the next transfer."""
    from kv_transfer.nccl import NcclKVReceiver, NcclKVSender

    src, dst = caches_on(SRC, torch.bfloat16, 0), caches_on(DST, torch.bfloat16, 1)
    before = [c.clone() for c in dst]

    async def main():
        receiver, sender = NcclKVReceiver(dst), NcclKVSender(SRC)
        await receiver.start()
        released = []

        async def cancel_at(i: int) -> None:
            if i == 2:  # layers 0 and 1 are sent; 2 and 3 follow after this wait
                release = asyncio.create_task(receiver.release("c"))
                await asyncio.sleep(0.2)
                released.append(release.done())  # still waiting for the layers in flight
                released.append(release)

        try:
            spec = spec_for(receiver, "c")
            future = receiver.expect("c", spec.dst_block_ids, spec.deadline)
            with pytest.raises(KVTransferError, match="cancelled"):
                await sender.send(spec, Layerwise(gather_blocks(src, SRC_IDS), cancel_at))
            assert future.cancelled()
            assert released[0] is False
            await asyncio.wait_for(released[1], 10.0)
            assert_untouched_outside(dst, before)
            await send_and_land(sender, receiver, "after", src, dst, before)
        finally:
            await sender.close()
            await receiver.close()

    run(main())
