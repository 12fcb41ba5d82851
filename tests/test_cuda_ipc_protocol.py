"""The cuda-ipc receiver's control protocol, on the CPU: admission, a reservation that ends while
the sender writes (the receiver says so at once; `release` waits for the sender's `stopped`), a
sender that stops by itself, falls silent or vanishes (the orphan grace), and malformed frames.

CUDA IPC itself cannot run here: the two CUDA parts of the receiver, the hello's GPU identity
and the export of its caches, are replaced in `HostIpcReceiver`; everything else is the real
receiver over a real socket, driven by a client speaking the wire format. tests/gpu covers the
real sender and the mapped writes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch

from kv_transfer import KVTransferError, gather_blocks
from kv_transfer.cuda_ipc import CudaIpcKVReceiver
from kv_transfer.tcp import ListeningReceiver, parse_endpoint
from kv_transfer.wire import (
    TransferHeader,
    json_frame,
    read_json_frame,
    tensor_frame_prefix,
    tensor_payload,
)
from tests.test_kv_transfer import DST_IDS, SRC_IDS, expect_failure, make_caches

GPU = "GPU-test"


class HostIpcReceiver(CudaIpcKVReceiver):
    """`CudaIpcKVReceiver` over CPU caches: its GPU is `GPU` and it exports nothing."""

    def __init__(self, caches: list[torch.Tensor], **kwargs: Any) -> None:
        stop_timeout_s = kwargs.pop("stop_timeout_s", 30.0)
        orphan_grace_s = kwargs.pop("orphan_grace_s", 2.0)
        ListeningReceiver.__init__(self, caches, **kwargs)  # no CUDA check
        self.device = caches[0].device
        self._gpu = GPU
        self._stop_timeout_s, self._orphan_grace_s = stop_timeout_s, orphan_grace_s

    def _exports(self) -> list[dict[str, Any]]:
        return []


def run(coro: Any, timeout_s: float = 20.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


class Client:
    """A sender's side of the control connection, frame by frame."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, receiver: CudaIpcKVReceiver, gpu: str = GPU) -> tuple[Client, Any]:
        host, port = parse_endpoint(receiver.endpoint, "cuda-ipc")
        client = cls(*await asyncio.open_connection(host, port))
        return client, await client.ask({"type": "hello", "gpu": gpu})

    async def ask(self, obj: Any) -> Any:
        self.send(obj)
        return await read_json_frame(self.reader)

    def send(self, obj: Any) -> None:
        self.writer.write(json_frame(obj))

    async def header(self, transfer_id: str, extras: dict[str, torch.Tensor] | None = None) -> Any:
        source = gather_blocks(make_caches(), SRC_IDS)
        header = TransferHeader.describe(
            transfer_id, DST_IDS, source.num_layers, source.layer(0), extras or {}
        )
        return await self.ask(header.to_json())


async def started(**kwargs: Any) -> HostIpcReceiver:
    receiver = HostIpcReceiver(make_caches(), **kwargs)
    await receiver.start()
    return receiver


def test_hello_checks_the_gpu_and_the_frame():
    async def main():
        receiver = await started()
        try:
            _, answer = await Client.connect(receiver, gpu="GPU-other")
            assert answer["status"] == "error" and "use the nccl transport" in answer["message"]
            client, _ = await Client.connect(receiver)
            host, port = parse_endpoint(receiver.endpoint, "cuda-ipc")
            bad = Client(*await asyncio.open_connection(host, port))
            answer = await bad.ask({"type": "header"})
            assert answer["status"] == "error" and "hello" in answer["message"]
        finally:
            await receiver.close()

    run(main())


def test_done_resolves_with_the_extras_and_the_pair_carries_on():
    extra = {"hidden": torch.arange(6.0).reshape(2, 3)}

    async def main():
        receiver = await started()
        try:
            client, hello = await Client.connect(receiver)
            assert hello == {"status": "ok", "caches": []}
            for i in range(2):
                future = receiver.expect(f"t{i}", DST_IDS, time.time() + 30)
                assert (await client.header(f"t{i}", extra))["status"] == "accept"
                client.send({"type": "done"})
                client.writer.write(tensor_frame_prefix(extra["hidden"]))
                client.writer.write(tensor_payload(extra["hidden"]))
                assert (await read_json_frame(client.reader))["status"] == "ok"
                got = await asyncio.wait_for(future, 5)
                assert torch.equal(got["hidden"], extra["hidden"])
                await asyncio.wait_for(receiver.release(f"t{i}"), 1)  # nothing left writing
            answer = await client.header("unknown")  # refused: the pair still serves
            assert answer["status"] == "error" and "not expected" in answer["message"]
        finally:
            await receiver.close()

    run(main())


def test_a_release_mid_transfer_is_answered_at_once_and_waits_for_stopped():
    async def main():
        receiver = await started()
        try:
            client, _ = await Client.connect(receiver)
            future = receiver.expect("c", DST_IDS, time.time() + 30)
            assert (await client.header("c"))["status"] == "accept"
            release = asyncio.create_task(receiver.release("c"))
            answer = await asyncio.wait_for(read_json_frame(client.reader), 5)
            assert answer["status"] == "error" and "cancelled" in answer["message"]
            await asyncio.sleep(0.2)
            assert not release.done()  # the sender's writes may still be running
            client.send({"type": "stopped", "message": "the receiver ended it"})
            await asyncio.wait_for(release, 5)
            assert future.cancelled()
            nxt = receiver.expect("next", DST_IDS, time.time() + 30)  # the pair carries on
            assert (await client.header("next"))["status"] == "accept"
            client.send({"type": "done"})
            assert (await read_json_frame(client.reader))["status"] == "ok"
            await asyncio.wait_for(nxt, 5)
        finally:
            await receiver.close()

    run(main())


def test_a_sender_that_stops_by_itself_fails_the_reservation():
    async def main():
        receiver = await started()
        try:
            client, _ = await Client.connect(receiver)
            future = receiver.expect("s", DST_IDS, time.time() + 30)
            assert (await client.header("s"))["status"] == "accept"
            answer = await client.ask({"type": "stopped", "message": "layer 2 failed"})
            assert answer["status"] == "error"
            error = await expect_failure(future)
            assert "the sender stopped (layer 2 failed)" in str(error)
            await asyncio.wait_for(receiver.release("s"), 1)
        finally:
            await receiver.close()

    run(main())


def test_a_sender_silent_after_the_error_loses_its_connection_then_the_grace_runs():
    async def main():
        receiver = await started(stop_timeout_s=0.3, orphan_grace_s=0.5)
        try:
            client, _ = await Client.connect(receiver)
            future = receiver.expect("q", DST_IDS, time.time() + 30)
            assert (await client.header("q"))["status"] == "accept"
            start = time.monotonic()
            release = asyncio.create_task(receiver.release("q"))
            assert (await read_json_frame(client.reader))["status"] == "error"
            assert await asyncio.wait_for(client.reader.read(), 5) == b""  # closed on us
            await asyncio.wait_for(release, 5)
            assert time.monotonic() - start >= 0.3 + 0.5 - 0.05  # stop timeout, then grace
            assert future.cancelled()
        finally:
            await receiver.close()

    run(main())


@pytest.mark.parametrize("how", ["vanishes", "garbles"])
def test_a_sender_that_vanishes_or_garbles_mid_transfer_fails_it_and_the_grace_holds_blocks(how):
    async def main():
        receiver = await started(orphan_grace_s=0.5)
        try:
            client, _ = await Client.connect(receiver)
            future = receiver.expect("v", DST_IDS, time.time() + 30)
            failed_at: list[float] = []
            future.add_done_callback(lambda _: failed_at.append(time.monotonic()))
            assert (await client.header("v"))["status"] == "accept"
            if how == "vanishes":
                client.writer.transport.abort()
            else:
                client.send({"type": "written?"})
            with pytest.raises(KVTransferError):
                await asyncio.wait_for(future, 5)
            await asyncio.wait_for(receiver.release("v"), 5)
            assert time.monotonic() - failed_at[0] >= 0.45  # its queued writes may still land
        finally:
            await receiver.close()

    run(main())
