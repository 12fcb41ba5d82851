"""The cuda-ipc KV transport between two processes on one GPU (how a prefill and a decode worker
sharing a GPU move KV): exact landing, refusals that keep the pair, a reservation cancelled
mid-transfer (the sender stops writing and `release` waits for it), a sender that dies
mid-transfer, and a receiver that dies under a sender (which fails cleanly, its GPU intact).

CUDA IPC maps the memory of another process only, so the senders run in
`tests.gpu.ipc_sender` processes while this process holds the receiver, and the other way round.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest
import torch

from kv_transfer import KVTransferError, TransferSpec, gather_blocks
from tests.gpu.ipc_sender import (
    DEVICE,
    EXTRA,
    Layerwise,
    receiver_caches,
    source_caches,
)
from tests.test_kv_transfer import DST_IDS, SRC_IDS, expect_failure, other_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TTL_S = 60.0


def run(coro, timeout_s: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


class SenderProcess:
    """`python -m tests.gpu.ipc_sender ENDPOINT SCENARIO DTYPE`, its JSON lines read as they
    come."""

    def __init__(self, endpoint: str, scenario: str, dtype: torch.dtype = torch.bfloat16):
        self.args = [endpoint, scenario, str(dtype).removeprefix("torch.")]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> SenderProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.gpu.ipc_sender", *self.args,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return self

    async def line(self) -> dict | None:
        assert self.proc is not None and self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        return json.loads(raw) if raw else None

    async def finish(self) -> tuple[int, dict[str, str | None]]:
        """Exit code and every send's error (None: it landed)."""
        sent = {}
        while (msg := await self.line()) is not None:
            if "sent" in msg:
                sent[msg["sent"]] = msg["error"]
        assert self.proc is not None
        return await self.proc.wait(), sent


async def run_sender(
    endpoint: str, scenario: str, dtype: torch.dtype = torch.bfloat16
) -> tuple[int, dict[str, str | None]]:
    """Run a sender process to its end: its exit code and every send's error."""
    return await (await SenderProcess(endpoint, scenario, dtype).start()).finish()


async def started_receiver(caches, **kwargs):
    from kv_transfer.cuda_ipc import CudaIpcKVReceiver

    receiver = CudaIpcKVReceiver(caches, **kwargs)
    await receiver.start()
    assert receiver.endpoint.startswith("cuda-ipc://127.0.0.1:")
    return receiver


def landed(dst, src, src_ids, dst_ids, layers=None) -> bool:
    layers = range(len(dst)) if layers is None else layers
    return all(torch.equal(dst[i][:, list(dst_ids)], src[i][:, list(src_ids)]) for i in layers)


def unchanged(dst, before, ids, layers=None) -> bool:
    layers = range(len(dst)) if layers is None else layers
    return all(torch.equal(dst[i][:, list(ids)], before[i][:, list(ids)]) for i in layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_transfers_land_exactly_and_reuse_the_pair(dtype):
    src, dst = source_caches(dtype), receiver_caches(dtype)
    before = [c.clone() for c in dst]
    sends = {"t1": (SRC_IDS, DST_IDS), "t2": ((1, 4), (5, 6)), "t3": ((0, 3, 8), (7, 8, 10))}

    async def main():
        receiver = await started_receiver(dst)
        try:
            deadline = time.time() + TTL_S
            futures = {t: receiver.expect(t, d, deadline) for t, (_, d) in sends.items()}
            code, sent = await run_sender(receiver.endpoint, "land", dtype)
            assert code == 0 and sent == {"t1": None, "t2": None, "t3": None}
            got = {t: await asyncio.wait_for(f, 5) for t, f in futures.items()}
            assert torch.equal(got["t1"]["hidden"], EXTRA) and got["t2"] == {}
        finally:
            await receiver.close()

    run(main())
    for src_ids, dst_ids in sends.values():
        assert landed(dst, src, src_ids, dst_ids)
    written = {b for _, d in sends.values() for b in d}
    assert unchanged(dst, before, other_blocks(sorted(written)))


def test_refusals_write_nothing_and_keep_the_pair():
    src, dst = source_caches(torch.bfloat16), receiver_caches(torch.bfloat16)
    before = [c.clone() for c in dst]

    async def main():
        receiver = await started_receiver(dst)
        try:
            deadline = time.time() + TTL_S
            wrong = receiver.expect("wrong-blocks", (1, 15, 6, 8), deadline)
            ok = receiver.expect("ok", DST_IDS, deadline)
            code, sent = await run_sender(receiver.endpoint, "refusals")
            assert code == 0
            assert "not expected" in sent["unknown"]
            assert "reservation holds" in sent["wrong-blocks"]
            assert "out of the receiver" in sent["out-of-range"]
            assert "not expected" in sent["gone"]
            assert sent["ok"] is None
            await expect_failure(wrong)
            await asyncio.wait_for(ok, 5)
        finally:
            await receiver.close()

    run(main())
    assert landed(dst, src, SRC_IDS, DST_IDS)
    assert unchanged(dst, before, other_blocks(DST_IDS))


def test_a_reservation_cancelled_mid_transfer_stops_the_writes_and_release_waits():
    """The sender pauses before layer 2; the decode side releases the reservation: the sender
    hears it, writes no further layer, says it stopped, and only then does `release` return.
    The pair then carries the next transfer."""
    src, dst = source_caches(torch.bfloat16), receiver_caches(torch.bfloat16)
    before = [c.clone() for c in dst]

    async def main():
        receiver = await started_receiver(dst)
        try:
            deadline = time.time() + TTL_S
            future = receiver.expect("c", DST_IDS, deadline)
            after = receiver.expect("after", (5, 6), deadline)
            sender = await SenderProcess(receiver.endpoint, "stall").start()
            assert await sender.line() == {"at": 2}  # layers 0 and 1 are written
            release = asyncio.create_task(receiver.release("c"))
            await asyncio.sleep(0.3)
            assert not release.done()  # the sender is still paused, its word not yet in
            await asyncio.wait_for(release, 10)
            assert future.cancelled()
            code, sent = await sender.finish()
            assert code == 0 and "cancelled" in sent["c"] and sent["after"] is None
            await asyncio.wait_for(after, 5)
        finally:
            await receiver.close()

    run(main())
    assert landed(dst, src, SRC_IDS, DST_IDS, layers=[0, 1])
    assert unchanged(dst, before, DST_IDS, layers=[2, 3])  # never written
    assert landed(dst, src, (1, 4), (5, 6))
    assert unchanged(dst, before, other_blocks((*DST_IDS, 5, 6)))


def test_a_sender_dying_mid_transfer_fails_the_reservation_and_the_next_sender_lands():
    src, dst = source_caches(torch.bfloat16), receiver_caches(torch.bfloat16)
    before = [c.clone() for c in dst]

    async def main():
        receiver = await started_receiver(dst, orphan_grace_s=1.0)
        try:
            future = receiver.expect("dying", DST_IDS, time.time() + TTL_S)
            failed_at = []
            future.add_done_callback(lambda _: failed_at.append(time.monotonic()))
            code, _ = await run_sender(receiver.endpoint, "die")
            assert code == 3
            await expect_failure(future, within_s=5.0)
            await asyncio.wait_for(receiver.release("dying"), 5)
            assert time.monotonic() - failed_at[0] > 0.9  # the orphan grace since it failed
            nxt = receiver.expect("next", DST_IDS, time.time() + TTL_S)
            code, sent = await run_sender(receiver.endpoint, "one")
            assert code == 0 and sent == {"next": None}
            await asyncio.wait_for(nxt, 5)
        finally:
            await receiver.close()

    run(main())
    assert landed(dst, src, SRC_IDS, DST_IDS)
    assert unchanged(dst, before, other_blocks(DST_IDS))


def test_a_receiver_dying_under_a_sender_fails_the_send_and_leaves_its_gpu_usable():
    """The decode worker's process is killed while the prefill side is between layers: the
    send fails with KVTransferError (no write into the dead process's memory is queued once
    its connection is gone), and this process's CUDA context still computes."""
    from bench.kv_transfer_pair import RemoteReceiver
    from kv_transfer.cuda_ipc import CudaIpcKVSender

    src = source_caches(torch.bfloat16)
    _, num_blocks, block_size, heads, head_dim = src[0].shape
    shape = (len(src), num_blocks, block_size, heads, head_dim)

    async def main():
        sender = CudaIpcKVSender(DEVICE)
        receiver = RemoteReceiver("cuda-ipc", "cuda:0", "bfloat16", shape)
        await receiver.__aenter__()
        proc = receiver._proc
        assert proc is not None

        async def kill_at(i: int) -> None:
            if i == 2:
                proc.kill()
                await proc.wait()
                await asyncio.sleep(0.2)

        try:
            await receiver.expect("first", (1, 2), time.time() + TTL_S)
            await sender.send(
                TransferSpec("first", receiver.endpoint, (1, 2), time.time() + TTL_S),
                gather_blocks(src, (3, 4)),
            )  # a working pair first: the caches are mapped
            await receiver.expect("t", DST_IDS, time.time() + TTL_S)
            spec = TransferSpec("t", receiver.endpoint, DST_IDS, time.time() + TTL_S)
            with pytest.raises(KVTransferError):
                await sender.send(spec, Layerwise(gather_blocks(src, SRC_IDS), kill_at))
            with pytest.raises(KVTransferError):  # nobody listens there any more
                spec = TransferSpec("u", receiver.endpoint, DST_IDS, time.time() + TTL_S)
                await sender.send(spec, gather_blocks(src, SRC_IDS))
        finally:
            await sender.close()
            if receiver._reader_task is not None:
                receiver._reader_task.cancel()

    run(main())
    torch.cuda.synchronize(DEVICE)
    x = torch.arange(1000.0, device=DEVICE)
    assert (x * 2).sum().item() == 999000.0


def test_timed_transfers_of_the_benchmark_harness_land():
    """bench.gpu_kv_transfer's one-GPU bandwidth runs this: a sender here, the receiver in a
    process of its own, every transfer's checksum compared."""
    from bench.kv_transfer_pair import RemoteReceiver, time_transfers
    from kv_transfer.cuda_ipc import CudaIpcKVSender

    src = source_caches(torch.bfloat16)
    _, num_blocks, block_size, heads, head_dim = src[0].shape
    shape = (len(src), num_blocks, block_size, heads, head_dim)

    async def main():
        sender = CudaIpcKVSender(DEVICE)
        try:
            async with RemoteReceiver("cuda-ipc", "cuda:0", "bfloat16", shape) as receiver:
                return await time_transfers(sender, receiver, src, 6, repeats=3, warmup=1)
        finally:
            await sender.close()

    times = run(main())
    assert len(times) == 3 and all(t > 0 for t in times)


def test_a_sender_on_another_gpu_is_refused_at_hello():
    """The hello names the sender's GPU; a receiver on another one refuses (nccl is for that)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    from kv_transfer.cuda_ipc import CudaIpcKVSender

    src = [c.to("cuda:1") for c in source_caches(torch.bfloat16)]

    async def main():
        receiver = await started_receiver(receiver_caches(torch.bfloat16))
        sender = CudaIpcKVSender("cuda:1")
        try:
            future = receiver.expect("x", DST_IDS, time.time() + TTL_S)
            spec = TransferSpec("x", receiver.endpoint, DST_IDS, time.time() + TTL_S)
            with pytest.raises(KVTransferError, match="use the nccl transport"):
                await sender.send(spec, gather_blocks(src, SRC_IDS))
            assert not future.done()
        finally:
            await sender.close()
            await receiver.close()

    run(main())
