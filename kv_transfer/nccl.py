"""KV transfer between GPUs over NCCL point-to-point (through cupy), controlled over TCP.

One prefill/decode pair shares one NCCL communicator (2 ranks: sender 0, receiver 1), made on
the pair's first transfer: the sender draws the unique id and passes it on a TCP control
connection that stays open for the pair's later transfers. Per transfer, on that connection::

    sender                                              receiver
    header JSON (kv_transfer.wire.TransferHeader) --->  claims and checks the reservation, then
    layer 0, 1, ...: one NCCL send each           ==>   queues every layer's receive into
      (one group when all are computed; else each       staging (two buffers of c layers,
      as soon as the prefill made it)                   alternating) and, chunk by chunk, one
                                                        scatter into the reserved blocks
    extras as tensor frames (CPU, small)          --->
                                                  <---  {status: ok | error} once it landed

No round trip before the data: the sender sends right behind the header, and the receiver
queues all of its GPU work at once, ordered by CUDA events (receive chunk k, scatter it, reuse
its buffer for chunk k + 2), so the host steps in only at the end. The data never leaves the
GPUs. Transfers of one pair run one at a time (a communicator's point-to-point operations match
in issue order); different pairs are independent. Sends run on a dedicated stream and first wait
for their data: the CUDA event of each layer of a layer-wise export
(engine.kv_connector.layerwise), so a layer goes while later ones are computed; otherwise the
work queued on the sender's current stream. Receives and scatters run on the receiver's own streams.

Refusals and failures: the receiver still receives the layers of a transfer it refuses (unknown,
cancelled, mismatched), into staging only, and answers `error`, so the communicator stays in
step and the pair in use. A side that waits past its deadline for the GPU aborts the
communicator (`ncclCommAbort` frees stuck kernels) and closes the control connection; the next
transfer to that peer makes a new communicator. Nothing ever blocks the event loop: NCCL calls
and waits for the GPU run on a per-pair thread.

Scatter safety: scatters are queued before the data arrives, so they may land after the
reservation was cancelled or expired; the blocks stay the transfer's until then: `release`
(what the decode worker calls before freeing a reservation's blocks) waits for them, and a
successful future resolves only once every scatter finished.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch

from kv_transfer.base import (
    KVLayerSource,
    KVTransferError,
    TransferRefused,
    TransferSpec,
    layer_event,
    layer_ready,
)
from kv_transfer.blocks import LayerScatter
from kv_transfer.reservations import Extras, Reservation
from kv_transfer.tcp import (
    ListeningReceiver,
    Pair,
    PairedSender,
    cuda_device_of,
    parse_endpoint,
    read_reply,
)
from kv_transfer.wire import (
    TransferHeader,
    json_frame,
    read_json_frame,
    read_tensor_frame,
    reply_frame,
    tensor_frame_prefix,
    tensor_payload,
)

log = logging.getLogger(__name__)

_WATCH_S = 0.01  # how often a wait for the GPU checks its deadline and the peer's connection
DEFAULT_STAGING_BYTES = 256 << 20  # receiver staging: two buffers of half this, alternating


def _nccl() -> Any:
    """cupy's NCCL bindings, whichever cupy-cudaXX wheel is installed."""
    try:
        from cupy.cuda import nccl
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise KVTransferError(f"the nccl transport needs cupy with NCCL: {exc}") from exc
    return nccl


def new_unique_id() -> bytes:
    """A fresh NCCL unique id as the bytes cupy's communicator takes (older cupy: a tuple of
    signed chars)."""
    uid = _nccl().get_unique_id()
    return uid if isinstance(uid, bytes) else bytes(x & 0xFF for x in uid)


def layers_per_chunk(layer_bytes: int, staging_bytes: int, num_layers: int) -> int:
    """How many layers one staging buffer of `staging_bytes` holds (at least one)."""
    return max(1, min(num_layers, staging_bytes // max(1, layer_bytes)))


async def wait_gpu(
    comm: _Comm,
    event: torch.cuda.Event,
    deadline: float,
    what: str,
    peer: asyncio.StreamReader | None = None,
) -> None:
    """Wait for `event` on the pair's thread (`cudaEventSynchronize` releases the GIL; the loop
    wakes as soon as it returns); see `watch` for the errors."""
    await watch(asyncio.ensure_future(comm.run(event.synchronize)), deadline, what, peer)


async def watch(
    work: asyncio.Future[Any],
    deadline: float,
    what: str,
    peer: asyncio.StreamReader | None = None,
) -> Any:
    """`work`'s result; `KVTransferError` at `deadline` (time.time()), or as soon as `peer`'s
    control connection closes (the peer will not do its part). `work` (on the pair's thread,
    maybe blocked in NCCL) is left running: the caller then aborts the communicator, which
    releases the thread."""
    while True:
        done, _ = await asyncio.wait({work}, timeout=_WATCH_S)
        if done:
            return work.result()
        if time.time() >= deadline:
            raise KVTransferError(f"{what}: the GPU did not finish before the deadline")
        if peer is not None and peer.at_eof():
            raise KVTransferError(f"{what}: the peer closed the connection mid-transfer")


async def _settle(
    posting: asyncio.Future[Any], queued: list[torch.cuda.Event], what: str, timeout_s: float = 10.0
) -> None:
    """After an abort: wait until the work being queued (`posting`, on the pair's thread) is
    over and the GPU has run what it queued (the aborted receives return, then the scatters
    behind them run), so the blocks may be reused."""
    end = time.monotonic() + timeout_s
    while not posting.done() or (queued and not queued[-1].query()):
        if time.monotonic() >= end:
            log.error("%s: GPU work still queued %.0f s after the abort", what, timeout_s)
            return
        await asyncio.sleep(0.002)
    if not posting.cancelled():
        posting.exception()  # seen: the abort made it fail


class _Comm:
    """One NCCL communicator of a pair, used from one thread (its `run` executor)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.scatter_stream = torch.cuda.Stream(device)  # receiver: staging -> cache blocks
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nccl")
        self._comm: Any = None
        self.staging: torch.Tensor | None = None  # the receiver's buffer, freed after the comm

    async def run(self, fn: Any, *args: Any, deadline: float | None = None) -> Any:
        """Run `fn(*args)` on this pair's thread, with the pair's device current.

        With a `deadline` (time.time()), `KVTransferError` once it passes: NCCL may block the
        thread (its peer-to-peer connection is set up at the first send/receive, with the peer).
        """

        def call() -> Any:
            import cupy

            with cupy.cuda.Device(self.device.index or 0):
                return fn(*args)

        work = asyncio.get_running_loop().run_in_executor(self._pool, call)
        if deadline is None:
            return await work
        try:
            return await asyncio.wait_for(work, max(0.0, deadline - time.time()))
        except TimeoutError as exc:
            raise KVTransferError("NCCL did not return before the deadline") from exc

    async def init(self, unique_id: bytes, rank: int) -> None:
        nccl = _nccl()
        self._comm = await self.run(nccl.NcclCommunicator, 2, unique_id, rank)

    def check_live(self) -> None:
        """`KVTransferError` once the communicator was aborted (from the pair's thread)."""
        if self._comm is None:
            raise KVTransferError("the NCCL communicator was aborted")

    def enqueue(self, tensors: Sequence[torch.Tensor], peer: int, send: bool) -> torch.cuda.Event:
        """Queue one NCCL group of sends (or receives) of whole tensors' bytes on `stream`;
        returns an event recorded after it."""
        nccl = _nccl()
        stream = self.stream.cuda_stream
        nccl.groupStart()
        try:
            for t in tensors:
                op = self._comm.send if send else self._comm.recv
                op(t.data_ptr(), t.numel() * t.element_size(), nccl.NCCL_UINT8, peer, stream)
        finally:
            nccl.groupEnd()
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def abort(self) -> None:
        """Abort the communicator: frees kernels stuck waiting for the peer. Idempotent."""
        comm, self._comm = self._comm, None
        if comm is not None:
            with contextlib.suppress(Exception):
                comm.abort()
        self.staging = None  # nothing can write it any more
        self._pool.shutdown(wait=False)

    def close(self) -> None:
        """End the communicator after its work finished. It is aborted, not destroyed:
        `ncclCommDestroy` may wait for the peer, and a worker shutting down must not hang."""
        self.abort()


class _Peer(Pair):
    """The sender's side of a pair: control connection, communicator, one transfer at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, comm: _Comm):
        super().__init__(reader, writer)
        self.comm = comm


class NcclKVSender(PairedSender[_Peer]):
    """Sends KV from CUDA tensors to `NcclKVReceiver`s on other GPUs, one communicator per peer."""

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the nccl transport needs a CUDA device, got {self.device}")

    def _kill(self, peer: _Peer) -> None:
        """Abort the pair's communicator and connection; the next send makes new ones."""
        peer.comm.abort()
        peer.writer.transport.abort()

    async def _connect(self, endpoint: str) -> _Peer:
        """Connect and make the pair's communicator."""
        host, port = parse_endpoint(endpoint, "nccl")
        reader, writer = await asyncio.open_connection(host, port)
        comm = _Comm(self.device)
        try:
            unique_id = new_unique_id()
            writer.write(json_frame({"type": "hello", "unique_id": unique_id.hex()}))
            await writer.drain()
            # Both ranks must be inside ncclCommInitRank at once: ours runs on the pair's
            # thread while the receiver joins.
            await asyncio.gather(comm.init(unique_id, 0), _expect_ok(reader))
        except BaseException:
            comm.abort()
            writer.transport.abort()
            raise
        return _Peer(reader, writer, comm)

    async def _transfer(
        self,
        peer: _Peer,
        spec: TransferSpec,
        layers: KVLayerSource,
        extras: Mapping[str, torch.Tensor],
    ) -> None:
        first = layers.layer(0)
        header = TransferHeader.describe(
            spec.transfer_id, spec.dst_block_ids, layers.num_layers, first, extras
        )
        tensors = [first] + [layers.layer(i) for i in range(1, layers.num_layers)]
        for t in tensors:  # before the header: once it is out, every layer must follow
            header.layer.check(t)
            if t.device != self.device or not t.is_contiguous():
                raise KVTransferError(
                    f"transfer {spec.transfer_id!r}: layers must be contiguous on {self.device}"
                )
        # No round trip before the data: the receiver drains what it refuses.
        peer.writer.write(json_frame(header.to_json()))
        stream = peer.comm.stream
        if not hasattr(layers, "ready"):
            # Computed already: every layer in one group, after the producer's queued work.
            stream.wait_stream(torch.cuda.current_stream(self.device))
            groups = [range(len(tensors))]
        else:
            groups = [range(i, i + 1) for i in range(len(tensors))]
        done = None
        for group in groups:
            for i in group:
                await layer_ready(layers, i)
                event = layer_event(layers, i)
                if event is not None:
                    stream.wait_event(event)
            chunk = [tensors[i] for i in group]
            done = await peer.comm.run(peer.comm.enqueue, chunk, 1, True, deadline=spec.deadline)
        for meta in header.extras:
            peer.writer.write(tensor_frame_prefix(extras[meta.name]))
            peer.writer.write(tensor_payload(extras[meta.name]))
        await peer.writer.drain()
        answer = await read_reply(peer.reader)
        # The receiver replies only after every byte arrived (or it aborted): the sends are done
        # or the connection is torn down. Keep `tensors` alive until the GPU says so.
        assert done is not None
        if not done.query():
            await wait_gpu(peer.comm, done, spec.deadline, f"transfer {spec.transfer_id!r}")
        if answer["status"] != "ok":
            raise TransferRefused(answer.get("message") or f"receiver answered {answer!r}")


async def _expect_ok(reader: asyncio.StreamReader) -> None:
    answer = await read_reply(reader)
    if answer["status"] != "ok":
        raise KVTransferError(answer.get("message") or f"nccl handshake failed: {answer!r}")


class NcclKVReceiver(ListeningReceiver):
    """Receives NCCL transfers into `kv_caches` (CUDA tensors on one device).

    Listens for control connections as `ListeningReceiver` does and advertises
    `nccl://advertise_host:port`. `staging_bytes` bounds the GPU memory a transfer stages at once
    (two buffers of half of it; whole layers, at least one); `options` are `ListeningReceiver`'s
    (`header_timeout_s` 30 s by default here).
    """

    SCHEME = "nccl"

    def __init__(
        self,
        kv_caches: Sequence[torch.Tensor],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        **options: Any,
    ) -> None:
        options.setdefault("header_timeout_s", 30.0)
        self.device = cuda_device_of(kv_caches, "nccl")
        super().__init__(kv_caches, host, port, **options)
        self._staging_bytes = staging_bytes
        self._scatter = LayerScatter(self.kv_caches)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Join the sender's communicator, then serve its transfers one after another."""
        comm = _Comm(self.device)
        healthy = False
        try:
            hello = await asyncio.wait_for(read_json_frame(reader), self._header_timeout_s)
            if not isinstance(hello, dict) or hello.get("type") != "hello":
                writer.write(reply_frame("error", "expected a hello frame with the NCCL id"))
                return
            await comm.init(bytes.fromhex(hello["unique_id"]), 1)
            writer.write(reply_frame("ok"))
            healthy = True
            while True:  # until the sender goes away
                obj = await read_json_frame(reader)
                healthy = False  # until the transfer ends cleanly: GPU work may be in flight
                healthy = await self._serve_one(obj, reader, writer, comm)
                if not healthy:
                    return
        except (KVTransferError, ValueError, KeyError):
            pass  # a failed pair: its transfers were failed; the sender reconnects
        finally:
            if healthy:
                comm.close()
            else:
                comm.abort()

    async def _serve_one(
        self,
        obj: Any,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        comm: _Comm,
    ) -> bool:
        """One transfer on an established pair; False when the pair must be torn down.

        The sender does not wait for an answer before sending, so a refused transfer is still
        received (into staging only, never scattered) to keep the pair in step.
        """
        header = TransferHeader.from_json(obj)  # unreadable: nothing to drain by, tear down
        res: Reservation | None = None
        refusal = ""
        try:
            res = self._claim(header)
        except KVTransferError as exc:
            refusal = str(exc)
        if res is None:
            await self._receive(header, None, comm, reader)
            writer.write(reply_frame("error", refusal))
            return True
        writing = self._writing[res.transfer_id] = asyncio.get_running_loop().create_future()
        try:
            extras = await self._receive(header, res, comm, reader)
        except KVTransferError as exc:  # the GPU did not deliver in time: give the pair up
            writer.write(reply_frame("error", str(exc)))
            return False
        finally:
            self._writing.pop(res.transfer_id, None)
            writing.set_result(None)
        if not res.live:
            writer.write(reply_frame("error", res.end_reason()))
            return True
        assert self._table is not None
        self._table.complete(res, extras)
        writer.write(reply_frame("ok"))
        await writer.drain()
        return True

    def _post_receives(
        self,
        header: TransferHeader,
        res: Reservation | None,
        comm: _Comm,
        per_chunk: int,
        queued: list[torch.cuda.Event],
    ) -> None:
        """On the pair's thread: queue each chunk of `per_chunk` layers' receive into a staging
        buffer (two alternate) and, for an admitted transfer, its scatter into the reserved
        blocks; append an event after each chunk to `queued`; wait for the last."""
        meta = header.layer
        comm.check_live()
        buffers = self._staging(comm, (per_chunk, *meta.shape), meta.dtype)
        index = None
        if res is not None:
            with torch.cuda.stream(comm.scatter_stream):
                index = res.block_ids.to(self.device)
        for k, lo in enumerate(range(0, header.num_layers, per_chunk)):
            n = min(per_chunk, header.num_layers - lo)
            staged = buffers[k % 2][:n]
            if k >= 2:  # the buffer's previous chunk must be scattered first
                comm.stream.wait_event(queued[k - 2])
            comm.scatter_stream.wait_event(comm.enqueue(list(staged), 0, False))
            comm.check_live()  # an abort may have released the receive: queue no scatter
            if index is not None:
                with torch.cuda.stream(comm.scatter_stream):
                    self._scatter(lo, index, staged)
            done = torch.cuda.Event()
            done.record(comm.scatter_stream)
            queued.append(done)
        queued[-1].synchronize()  # in the same hop: cudaEventSynchronize drops the GIL

    async def _receive(
        self,
        header: TransferHeader,
        res: Reservation | None,
        comm: _Comm,
        reader: asyncio.StreamReader,
    ) -> Extras:
        """Queue every layer's receive into staging and, for an admitted transfer (`res`), its
        scatter into the reserved blocks; wait for the last of them on the GPU; read the extras.

        Two staging buffers alternate, so chunk k+1 arrives while chunk k is scattered; it is all
        queued at once, ordered on the GPU by events, so the host is not in the loop, and the
        pair's thread then waits for the last scatter (one hop to that thread in all). Writes
        queued here land even if the reservation ends meanwhile: `release` waits for them. On
        any failure the communicator is aborted, the queued work allowed to finish, and `res`
        failed before this raises.
        """
        meta = header.layer
        what = f"transfer {header.transfer_id!r}"
        per_chunk = layers_per_chunk(meta.nbytes, self._staging_bytes // 2, header.num_layers)
        deadline = res.deadline if res is not None else time.time() + self._header_timeout_s
        grace = max(deadline, time.time()) + 5.0  # drain a dying transfer a little longer
        queued: list[torch.cuda.Event] = []  # after each chunk's scatter (or receive)
        post = partial(self._post_receives, header, res, comm, per_chunk, queued)
        posting = asyncio.ensure_future(comm.run(post))
        try:
            # NCCL may block connecting to the peer; then the GPU runs what was queued.
            await watch(posting, grace, what, reader)
            extras: Extras = {}
            for extra in header.extras:
                extras[extra.name] = await read_tensor_frame(reader, extra)
            return extras
        except BaseException as exc:
            if res is not None and self._table is not None:
                error = (
                    exc if isinstance(exc, KVTransferError) else KVTransferError(f"{what}: {exc!r}")
                )
                self._table.fail(res, error)  # now: the owner learns at once; release waits
            staging = comm.staging  # the queued scatters still read it
            comm.abort()  # frees receives stuck waiting for a sender that is gone
            await _settle(posting, queued, what)
            del staging
            raise

    def _staging(
        self, comm: _Comm, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two staging buffers of `shape` (c, 2, n, block_size, Hkv, D), from one allocation
        kept on the pair: an aborted receive can never write memory given to someone else."""
        numel = math.prod(shape)
        if comm.staging is None or comm.staging.numel() < 2 * numel or comm.staging.dtype != dtype:
            comm.staging = None
            comm.staging = torch.empty(2 * numel, dtype=dtype, device=self.device)
        return comm.staging[:numel].view(shape), comm.staging[numel : 2 * numel].view(shape)
