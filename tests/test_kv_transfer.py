"""KV transfer: tcp and local transports move blocks exactly, refuse what they must, never hang.

Every test runs its coroutine under `asyncio.wait_for(..., TEST_TIMEOUT_S)` so a hang fails
instead of blocking the suite.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import torch

from kv_transfer import (
    KVLayerSource,
    KVReceiver,
    KVSender,
    KVTransferError,
    LocalKVReceiver,
    LocalKVSender,
    TcpKVReceiver,
    TcpKVSender,
    TransferSpec,
    gather_blocks,
    scatter_layer,
)
from kv_transfer.tcp import format_endpoint, parse_endpoint
from kv_transfer.wire import (
    TransferHeader,
    json_frame,
    read_json_frame,
    tensor_frame_prefix,
    tensor_payload,
)

TEST_TIMEOUT_S = 10.0
PROMPT_S = 2.0  # "promptly": a failure must show well before any lease would end
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 3, 16, 4, 2, 8
SRC_IDS = (7, 2, 11, 5)
DST_IDS = (3, 9, 0, 14)
TRANSPORTS = ["tcp", "local"]
DTYPES = [torch.float32, torch.bfloat16]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on a fresh event loop, failing the test if it takes over TEST_TIMEOUT_S."""
    return asyncio.run(asyncio.wait_for(coro, TEST_TIMEOUT_S))


def make_caches(
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    num_layers: int = NUM_LAYERS,
    head_dim: int = HEAD_DIM,
) -> list[torch.Tensor]:
    """Random paged caches: num_layers x (2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, head_dim)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, head_dim)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(num_layers)]


def clone_all(caches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [c.clone() for c in caches]


def other_blocks(ids: Sequence[int]) -> list[int]:
    return [b for b in range(NUM_BLOCKS) if b not in ids]


def assert_landed(
    dst: Sequence[torch.Tensor],
    before: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    src_ids: Sequence[int] = SRC_IDS,
    dst_ids: Sequence[int] = DST_IDS,
) -> None:
    """Destination blocks equal the source blocks exactly; every other block is unchanged."""
    rest = other_blocks(dst_ids)
    for layer in range(len(dst)):
        assert torch.equal(dst[layer][:, list(dst_ids)], src[layer][:, list(src_ids)])
        assert torch.equal(dst[layer][:, rest], before[layer][:, rest])


def assert_untouched(dst: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> None:
    for now, then in zip(dst, before, strict=True):
        assert torch.equal(now, then)


@asynccontextmanager
async def transport_pair(
    transport: str, caches: Sequence[torch.Tensor]
) -> AsyncIterator[tuple[KVReceiver, KVSender]]:
    """A started receiver over `caches` and a sender of the given transport; closed on exit."""
    receiver: KVReceiver
    sender: KVSender
    if transport == "tcp":
        receiver, sender = TcpKVReceiver(caches), TcpKVSender()
    else:
        receiver, sender = LocalKVReceiver(caches, f"test-{uuid.uuid4().hex}"), LocalKVSender()
    await receiver.start()
    try:
        yield receiver, sender
    finally:
        await sender.close()
        await receiver.close()


def spec_for(
    receiver: KVReceiver, transfer_id: str, dst_ids: Sequence[int] = DST_IDS, ttl_s: float = 5.0
) -> TransferSpec:
    return TransferSpec(transfer_id, receiver.endpoint, tuple(dst_ids), time.time() + ttl_s)


async def expect_failure(future: Awaitable[Any], within_s: float = PROMPT_S) -> KVTransferError:
    """Await `future` (at most `within_s` seconds); it must fail with KVTransferError."""
    with pytest.raises(KVTransferError) as info:
        await asyncio.wait_for(future, within_s)
    return info.value


class HookedSource:
    """A layer source that runs `hook(i)` before handing out layer `i`."""

    def __init__(self, inner: KVLayerSource, hook: Callable[[int], None]) -> None:
        self._inner, self._hook = inner, hook

    @property
    def num_layers(self) -> int:
        return self._inner.num_layers

    def layer(self, i: int) -> torch.Tensor:
        self._hook(i)
        return self._inner.layer(i)


# ----------------------------------------------------------------------------- both transports


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_transfer_lands_exactly_with_extras(transport: str, dtype: torch.dtype) -> None:
    src, dst = make_caches(dtype, seed=1), make_caches(dtype, seed=2)
    before = clone_all(dst)
    extra = {"hidden": torch.randn(3, 32).to(dtype), "token": torch.tensor(7)}

    async def scenario() -> dict[str, torch.Tensor]:
        async with transport_pair(transport, dst) as (receiver, sender):
            spec = spec_for(receiver, "t1")
            future = receiver.expect("t1", spec.dst_block_ids, spec.deadline)
            await sender.send(spec, gather_blocks(src, SRC_IDS), extra)
            assert future.done()  # send returns only once the KV is in place
            return await future

    got = run(scenario())
    assert_landed(dst, before, src)
    assert set(got) == set(extra)
    for name, tensor in extra.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unexpected_transfer_is_refused(transport: str) -> None:
    src, dst = make_caches(seed=1), make_caches(seed=2)
    before = clone_all(dst)

    async def scenario() -> None:
        async with transport_pair(transport, dst) as (receiver, sender):
            receiver.expect("known", DST_IDS, time.time() + 5)
            with pytest.raises(KVTransferError, match="not expected"):
                await sender.send(spec_for(receiver, "stranger"), gather_blocks(src, SRC_IDS))

    run(scenario())
    assert_untouched(dst, before)


MISMATCHES: dict[str, Callable[[], tuple[list[torch.Tensor], Sequence[int]]]] = {
    "dtype": lambda: (make_caches(torch.bfloat16, seed=1), SRC_IDS),
    "head_dim": lambda: (make_caches(seed=1, head_dim=HEAD_DIM * 2), SRC_IDS),
    "num_layers": lambda: (make_caches(seed=1, num_layers=NUM_LAYERS + 1), SRC_IDS),
    "num_blocks": lambda: (make_caches(seed=1), SRC_IDS[:3]),
}


@pytest.mark.parametrize("mismatch", sorted(MISMATCHES))
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_layout_mismatch_fails_both_sides(transport: str, mismatch: str) -> None:
    src, src_ids = MISMATCHES[mismatch]()
    dst = make_caches(seed=2)
    before = clone_all(dst)

    async def scenario() -> None:
        async with transport_pair(transport, dst) as (receiver, sender):
            spec = spec_for(receiver, "t1")
            future = receiver.expect("t1", spec.dst_block_ids, spec.deadline)
            with pytest.raises(KVTransferError):
                await sender.send(spec, gather_blocks(src, src_ids))
            await expect_failure(future)

    run(scenario())
    assert_untouched(dst, before)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_spec_for_other_blocks_fails_both_sides(transport: str) -> None:
    src, dst = make_caches(seed=1), make_caches(seed=2)
    before = clone_all(dst)

    async def scenario() -> None:
        async with transport_pair(transport, dst) as (receiver, sender):
            spec = spec_for(receiver, "t1")
            future = receiver.expect("t1", (1, 15, 6, 8), spec.deadline)  # not spec's blocks
            with pytest.raises(KVTransferError, match="reservation holds"):
                await sender.send(spec, gather_blocks(src, SRC_IDS))
            await expect_failure(future)

    run(scenario())
    assert_untouched(dst, before)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_deadline_passed_before_send(transport: str) -> None:
    src, dst = make_caches(seed=1), make_caches(seed=2)
    before = clone_all(dst)

    async def scenario() -> None:
        async with transport_pair(transport, dst) as (receiver, sender):
            spec = spec_for(receiver, "t1", ttl_s=0.1)
            future = receiver.expect("t1", spec.dst_block_ids, spec.deadline)
            await expect_failure(future)  # the lease ends at the deadline with no sender at all
            with pytest.raises(KVTransferError, match="deadline"):
                await sender.send(spec, gather_blocks(src, SRC_IDS))
            # A sender whose clock runs late still finds the reservation gone.
            late = spec_for(receiver, "t1", ttl_s=5.0)
            with pytest.raises(KVTransferError, match="not expected"):
                await sender.send(late, gather_blocks(src, SRC_IDS))

    run(scenario())
    assert_untouched(dst, before)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_refuses_a_later_send(transport: str) -> None:
    src, dst = make_caches(seed=1), make_caches(seed=2)
    before = clone_all(dst)

    async def scenario() -> None:
        async with transport_pair(transport, dst) as (receiver, sender):
            spec = spec_for(receiver, "t1")
            future = receiver.expect("t1", spec.dst_block_ids, spec.deadline)
            receiver.cancel("t1")
            assert future.cancelled()
            with pytest.raises(KVTransferError, match="not expected"):
                await sender.send(spec, gather_blocks(src, SRC_IDS))

    run(scenario())
    assert_untouched(dst, before)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_mid_transfer_stops_writes(transport: str) -> None:
    src, dst = make_caches(seed=1), make_caches(seed=2)
    before = clone_all(dst)

    async def scenario() -> None:
        async with transport_pair(transport, dst) as (receiver, sender):
            spec = spec_for(receiver, "t1")
            future = receiver.expect("t1", spec.dst_block_ids, spec.deadline)

            def cancel_before_layer_1(i: int) -> None:
                if i == 1:
                    receiver.cancel("t1")

            source = HookedSource(gather_blocks(src, SRC_IDS), cancel_before_layer_1)
            with pytest.raises(KVTransferError, match="cancelled"):
                await sender.send(spec, source)
            assert future.cancelled()

    run(scenario())
    assert_untouched(dst[1:], before[1:])  # layer 0 may have landed; nothing after the cancel


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_concurrent_transfers_both_land(transport: str) -> None:
    src_a, src_b, dst = make_caches(seed=1), make_caches(seed=3), make_caches(seed=2)
    before = clone_all(dst)
    dst_a, dst_b = (3, 9, 0, 14), (1, 15, 6, 8)

    async def scenario() -> None:
        async with transport_pair(transport, dst) as (receiver, sender):
            spec_a, spec_b = spec_for(receiver, "a", dst_a), spec_for(receiver, "b", dst_b)
            fut_a = receiver.expect("a", dst_a, spec_a.deadline)
            fut_b = receiver.expect("b", dst_b, spec_b.deadline)
            await asyncio.gather(
                sender.send(spec_a, gather_blocks(src_a, SRC_IDS)),
                sender.send(spec_b, gather_blocks(src_b, SRC_IDS)),
            )
            await asyncio.gather(fut_a, fut_b)

    run(scenario())
    rest = other_blocks(dst_a + dst_b)
    for layer in range(NUM_LAYERS):
        assert torch.equal(dst[layer][:, list(dst_a)], src_a[layer][:, list(SRC_IDS)])
        assert torch.equal(dst[layer][:, list(dst_b)], src_b[layer][:, list(SRC_IDS)])
        assert torch.equal(dst[layer][:, rest], before[layer][:, rest])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_close_fails_pending_reservations(transport: str) -> None:
    async def scenario() -> None:
        async with transport_pair(transport, make_caches()) as (receiver, _):
            future = receiver.expect("t1", DST_IDS, time.time() + 5)
            await receiver.close()
            error = await expect_failure(future)
            assert "closed" in str(error)

    run(scenario())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_expect_rejects_bad_reservations(transport: str) -> None:
    async def scenario() -> None:
        async with transport_pair(transport, make_caches()) as (receiver, _):
            deadline = time.time() + 5
            with pytest.raises(ValueError, match="range"):
                receiver.expect("t1", (0, NUM_BLOCKS), deadline)
            with pytest.raises(ValueError, match="distinct"):
                receiver.expect("t1", (1, 1), deadline)
            receiver.expect("t1", (1, 2), deadline)
            with pytest.raises(ValueError, match="already expected"):
                receiver.expect("t1", (3, 4), deadline)
            receiver.cancel("t1")
            receiver.expect("t1", (3, 4), deadline)  # a cancelled id may be reserved again

    run(scenario())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_failing_layer_source_fails_the_reservation(transport: str) -> None:
    src, dst = make_caches(seed=1), make_caches(seed=2)
    before = clone_all(dst)

    def crash_at_layer_1(i: int) -> None:
        if i == 1:
            raise RuntimeError("prefill crashed")

    async def scenario() -> None:
        async with transport_pair(transport, dst) as (receiver, sender):
            spec = spec_for(receiver, "t1")
            future = receiver.expect("t1", spec.dst_block_ids, spec.deadline)
            source = HookedSource(gather_blocks(src, SRC_IDS), crash_at_layer_1)
            with pytest.raises(RuntimeError, match="prefill crashed"):
                await sender.send(spec, source)
            await expect_failure(future)

    run(scenario())
    assert_untouched(dst[1:], before[1:])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_layers_larger_than_a_read_chunk_land(transport: str) -> None:
    shape = (2, NUM_BLOCKS, 16, 8, 256)  # 2 MiB per layer of 4 blocks: several read chunks
    gen = torch.Generator().manual_seed(5)
    src = [torch.randn(shape, generator=gen) for _ in range(2)]
    dst = [torch.zeros(shape) for _ in range(2)]
    before = clone_all(dst)

    async def scenario() -> None:
        async with transport_pair(transport, dst) as (receiver, sender):
            spec = spec_for(receiver, "big")
            future = receiver.expect("big", spec.dst_block_ids, spec.deadline)
            await sender.send(spec, gather_blocks(src, SRC_IDS))
            await future

    run(scenario())
    assert_landed(dst, before, src)


# ------------------------------------------------------------------------------------- tcp only


async def raw_client(endpoint: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*parse_endpoint(endpoint))


async def misbehave(endpoint: str, src: Sequence[torch.Tensor], cut: str) -> None:
    """Open transfer "t1" by hand, then stop sending at `cut` and drop the connection."""
    source = gather_blocks(src, SRC_IDS)
    reader, writer = await raw_client(endpoint)
    header = TransferHeader.describe("t1", DST_IDS, NUM_LAYERS, source.layer(0), {})
    writer.write(json_frame(header.to_json()))
    assert (await read_json_frame(reader))["status"] == "accept"
    payload = tensor_payload(source.layer(0))
    if cut == "mid_layer":
        writer.write(tensor_frame_prefix(source.layer(0)) + bytes(payload[: len(payload) // 2]))
    elif cut == "after_one_layer":
        writer.write(tensor_frame_prefix(source.layer(0)) + bytes(payload))
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("cut", ["after_header", "mid_layer", "after_one_layer"])
def test_tcp_sender_dying_mid_stream_fails_promptly(cut: str) -> None:
    src, dst = make_caches(seed=1), make_caches(seed=2)
    before = clone_all(dst)

    async def scenario() -> str:
        async with transport_pair("tcp", dst) as (receiver, _):
            future = receiver.expect("t1", DST_IDS, time.time() + 60)  # far: loss must not wait
            await misbehave(receiver.endpoint, src, cut)
            return str(await expect_failure(future))

    assert "connection lost" in run(scenario())
    rest = other_blocks(DST_IDS)
    for layer in range(NUM_LAYERS):
        assert torch.equal(dst[layer][:, rest], before[layer][:, rest])
    if cut != "after_one_layer":
        assert_untouched(dst, before)


def test_tcp_stalled_sender_fails_at_the_deadline() -> None:
    src, dst = make_caches(seed=1), make_caches(seed=2)

    async def scenario() -> None:
        async with transport_pair("tcp", dst) as (receiver, _):
            future = receiver.expect("t1", DST_IDS, time.time() + 0.3)
            reader, writer = await raw_client(receiver.endpoint)
            layer0 = src[0][:, list(SRC_IDS)]
            header = TransferHeader.describe("t1", DST_IDS, NUM_LAYERS, layer0, {})
            writer.write(json_frame(header.to_json()))
            assert (await read_json_frame(reader))["status"] == "accept"
            error = await expect_failure(future)  # the sender stays connected, silent
            assert "deadline" in str(error)
            reply = await asyncio.wait_for(read_json_frame(reader), PROMPT_S)
            assert reply["status"] == "error"
            writer.close()

    run(scenario())


def test_tcp_garbage_header_is_refused() -> None:
    async def scenario() -> None:
        async with transport_pair("tcp", make_caches()) as (receiver, _):
            future = receiver.expect("t1", DST_IDS, time.time() + 5)
            reader, writer = await raw_client(receiver.endpoint)
            writer.write(json_frame({"transfer_id": "t1"}))
            reply = await asyncio.wait_for(read_json_frame(reader), PROMPT_S)
            assert reply["status"] == "error" and "header" in reply["message"]
            writer.close()
            assert not future.done()  # a stranger's junk does not spend the reservation

    run(scenario())


def test_tcp_send_to_a_silent_receiver_stops_at_the_deadline() -> None:
    src = make_caches(seed=1)

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        spec = TransferSpec("t1", f"tcp://127.0.0.1:{port}", DST_IDS, time.time() + 0.3)
        try:
            with pytest.raises(KVTransferError, match="deadline"):
                await asyncio.wait_for(TcpKVSender().send(spec, gather_blocks(src, SRC_IDS)), 2)
        finally:
            server.close()

    run(scenario())


def test_tcp_send_to_nobody_fails() -> None:
    async def scenario() -> None:
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        spec = TransferSpec("t1", f"tcp://127.0.0.1:{port}", DST_IDS, time.time() + 5)
        with pytest.raises(KVTransferError, match="connection"):
            await TcpKVSender().send(spec, gather_blocks(make_caches(), SRC_IDS))

    run(scenario())


def test_tcp_sender_close_aborts_sends_in_flight() -> None:
    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        spec = TransferSpec("t1", f"tcp://127.0.0.1:{port}", DST_IDS, time.time() + 60)
        sender = TcpKVSender()
        send = asyncio.create_task(sender.send(spec, gather_blocks(make_caches(), SRC_IDS)))
        await asyncio.sleep(0.05)
        await sender.close()
        try:
            await expect_failure(send)
            with pytest.raises(KVTransferError, match="closed"):
                await sender.send(spec, gather_blocks(make_caches(), SRC_IDS))
        finally:
            server.close()

    run(scenario())


def test_tcp_endpoints_round_trip() -> None:
    assert parse_endpoint(format_endpoint("10.0.0.5", 5601)) == ("10.0.0.5", 5601)
    assert parse_endpoint(format_endpoint("::1", 5601)) == ("::1", 5601)
    for bad in ("local://x", "tcp://host", "tcp://:5601", "tcp://host:port"):
        with pytest.raises(KVTransferError):
            parse_endpoint(bad)


# ----------------------------------------------------------------------------------- local only


def test_local_receiver_on_another_threads_loop() -> None:
    src, dst = make_caches(torch.bfloat16, seed=1), make_caches(torch.bfloat16, seed=2)
    before = clone_all(dst)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    receiver = LocalKVReceiver(dst, f"test-{uuid.uuid4().hex}")

    async def expect() -> asyncio.Future[dict[str, torch.Tensor]]:
        await receiver.start()
        return receiver.expect("t1", DST_IDS, time.time() + 5)

    try:
        future = asyncio.run_coroutine_threadsafe(expect(), loop).result(TEST_TIMEOUT_S)
        run(LocalKVSender().send(spec_for(receiver, "t1"), gather_blocks(src, SRC_IDS)))
        assert asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(future, PROMPT_S), loop
        ).result(TEST_TIMEOUT_S) == {}
        asyncio.run_coroutine_threadsafe(receiver.close(), loop).result(TEST_TIMEOUT_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(TEST_TIMEOUT_S)
        loop.close()
    assert_landed(dst, before, src)


def test_local_unknown_endpoint_fails() -> None:
    spec = TransferSpec("t1", "local://nobody-here", DST_IDS, time.time() + 5)
    with pytest.raises(KVTransferError, match="no local KV receiver"):
        run(LocalKVSender().send(spec, gather_blocks(make_caches(), SRC_IDS)))


# ------------------------------------------------------------------------------ gather / scatter


def test_gather_then_scatter_moves_blocks() -> None:
    src, dst = make_caches(seed=1), make_caches(seed=2)
    before = clone_all(dst)
    source = gather_blocks(src, SRC_IDS)
    assert source.num_layers == NUM_LAYERS
    for i in range(NUM_LAYERS):
        layer = source.layer(i)
        assert layer.is_contiguous()
        assert layer.shape == (2, len(SRC_IDS), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        scatter_layer(dst[i], DST_IDS, layer)
    assert_landed(dst, before, src)


def test_layer_scatter_writes_a_run_of_layers() -> None:
    """The receiving end's multi-layer scatter (its CPU path; the GPU kernel has its own test):
    layers 1..NUM_LAYERS-1 land at the blocks, layer 0 and other blocks stay."""
    from kv_transfer.blocks import LayerScatter

    src, dst = make_caches(seed=1), make_caches(seed=2)
    before = clone_all(dst)
    source = gather_blocks(src, SRC_IDS)
    data = torch.stack([source.layer(i) for i in range(1, NUM_LAYERS)])
    LayerScatter(dst)(1, torch.tensor(DST_IDS), data)
    assert torch.equal(dst[0], before[0])
    assert_landed(dst[1:], before[1:], src[1:])
    # The same from a tensor per layer (how a CUDA IPC sender writes a computed source).
    dst = make_caches(seed=2)
    LayerScatter(dst).each(1, torch.tensor(DST_IDS), list(data))
    assert torch.equal(dst[0], before[0])
    assert_landed(dst[1:], before[1:], src[1:])


def test_release_of_a_tcp_reservation_is_its_cancel() -> None:
    """`release` (what the decode worker calls before freeing blocks) cancels the reservation;
    a transport that writes only while the future is pending has nothing more to wait for."""

    async def scenario() -> None:
        receiver = TcpKVReceiver(make_caches())
        await receiver.start()
        try:
            future = receiver.expect("r", DST_IDS, time.time() + 10)
            await receiver.release("r")
            assert future.cancelled()
            await receiver.release("unknown")  # no-op
        finally:
            await receiver.close()

    asyncio.run(scenario())


def test_endpoint_sender_and_receiver_choice() -> None:
    """The prefill side picks the transport from the endpoint; nccl needs CUDA on both sides."""
    from kv_transfer.dispatch import EndpointSender, make_receiver

    sender = EndpointSender(torch.device("cpu"))
    source = gather_blocks(make_caches(), SRC_IDS)
    cases = (
        ("nccl://127.0.0.1:1", "needs a GPU"),
        ("cuda-ipc://127.0.0.1:1", "needs a GPU"),
        ("rdma://h:1", "unknown"),
    )
    for endpoint, match in cases:
        spec = TransferSpec("t", endpoint, DST_IDS, time.time() + 5)
        with pytest.raises(KVTransferError, match=match):
            run(sender.send(spec, source))
    assert isinstance(make_receiver("tcp", make_caches(), "127.0.0.1", 0), TcpKVReceiver)
    for transport in ("nccl", "cuda-ipc"):
        with pytest.raises(ValueError, match="CUDA"):
            make_receiver(transport, make_caches(), "127.0.0.1", 0)
    with pytest.raises(ValueError, match="kv transport"):
        make_receiver("ipc", make_caches(), "127.0.0.1", 0)


def test_a_malformed_cuda_ipc_export_is_refused_before_cuda_is_touched() -> None:
    """A receiver's cache export that does not parse fails the sender's hello cleanly."""
    from kv_transfer.cuda_ipc import import_cache

    good = {"shape": [2, 4], "stride": [4, 1], "offset": 0, "dtype": "bfloat16",
            "handle": "00ff", "storage_bytes": 16, "storage_offset": 0, "ref_handle": "aa",
            "ref_offset": 0, "event_handle": None, "event_sync": False}  # fmt: skip
    for bad in (
        {k: v for k, v in good.items() if k != "handle"},
        good | {"handle": "not hex"},
        good | {"offset": -1},
        good | {"storage_bytes": "16"},
        good | {"dtype": "complex32"},
        good | {"shape": "2x4"},
        "not an object",
    ):
        with pytest.raises(KVTransferError, match="malformed KV cache export"):
            import_cache(bad, torch.device("cuda", 0))


def test_paired_sender_keeps_a_pair_until_a_transfer_fails() -> None:
    """The nccl and cuda-ipc senders' shared part (`PairedSender`), over a real socket: one
    connection serves transfer after transfer; a clean refusal keeps it; a failure or a missed
    deadline ends it (`_kill`) and the next send connects again, as it does at once when the
    receiver closed the connection between transfers; after close, sends fail."""
    from kv_transfer.base import TransferRefused
    from kv_transfer.tcp import Pair, PairedSender, read_reply

    connections: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            try:
                obj = await read_json_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the sender ended the pair
            what = obj["transfer_id"].split("-")[0]
            if what == "cut":
                writer.close()
                return
            if what != "silent":
                writer.write(json_frame({"status": "ok" if what in ("ok", "last") else "no"}))
            if what == "last":  # the receiver goes away between transfers
                writer.close()
                return

    class Sender(PairedSender[Pair]):
        def __init__(self, port: int) -> None:
            super().__init__()
            self.port, self.killed = port, 0

        async def _connect(self, endpoint: str) -> Pair:
            return Pair(*await asyncio.open_connection("127.0.0.1", self.port))

        async def _transfer(self, pair, spec, layers, extras) -> None:
            pair.writer.write(json_frame({"transfer_id": spec.transfer_id}))
            if (await read_reply(pair.reader))["status"] != "ok":
                raise TransferRefused(f"{spec.transfer_id} refused")

        def _kill(self, pair: Pair) -> None:
            self.killed += 1
            pair.writer.transport.abort()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        sender = Sender(server.sockets[0].getsockname()[1])
        source = gather_blocks(make_caches(), SRC_IDS)

        async def send(transfer_id: str, ttl_s: float = 5.0) -> None:
            spec = TransferSpec(transfer_id, "x://pair", DST_IDS, time.time() + ttl_s)
            await sender.send(spec, source)

        try:
            await send("ok-1")
            await send("ok-2")
            with pytest.raises(TransferRefused):
                await send("no-1")
            await send("ok-3")
            assert len(connections) == 1 and sender.killed == 0
            with pytest.raises(KVTransferError, match="connection to x://pair failed"):
                await send("cut-1")
            assert sender.killed == 1
            await send("ok-4")
            assert len(connections) == 2
            with pytest.raises(KVTransferError, match="deadline passed"):
                await send("silent-1", ttl_s=0.3)
            assert sender.killed == 2
            await send("ok-5")
            assert len(connections) == 3
            await send("last-1")  # it lands; then the receiver closes the connection
            await asyncio.sleep(0.1)
            await send("ok-6")  # no failed transfer: a new connection at once
            assert len(connections) == 4 and sender.killed == 3
            await sender.close()
            assert sender.killed == 4
            with pytest.raises(KVTransferError, match="closed"):
                await send("ok-7")
        finally:
            server.close()

    run(main())
