"""KV transfer between processes on one GPU through CUDA IPC, controlled over TCP.

NCCL cannot join two ranks on one GPU, so a prefill and a decode worker that share one (`baton
serve` on a one-GPU machine) move KV this way rather than through the host. The decode worker
exports its paged caches to each prefill worker that connects, once (CUDA IPC handles, made and
opened by torch's own sharing of CUDA storages); the prefill worker then writes each transfer's
layers straight into the reserved blocks, on a stream of its own: a computed source in one launch
of the block-copy kernel, a layer-wise export one layer at a time as the prefill makes them. The
data is copied once, on the GPU. One TCP control connection per pair carries, in order::

    sender                                              receiver
    hello {gpu}                                  --->   checks it is its own GPU
                                                 <---   {status: ok, caches: [exports]}
    per transfer, one at a time:
    header JSON (kv_transfer.wire.TransferHeader) --->  claims and checks the reservation
                                                 <---   {status: accept | error}
    writes layer 0, 1, ... into the mapped caches
    once the GPU ran them: {type: done}, extras  --->   resolves the reservation's future
                                                 <---   {status: ok | error}

The writes are the sender's, so keeping `KVReceiver`'s promises (nothing written once a
reservation is over; `release` returns once nothing can write its blocks) takes both sides:
- a reservation that ends mid-transfer (cancel, deadline, close): the receiver answers `error`
  at once; the sender queues no further layer, waits until the GPU ran the ones it queued, and
  says `{type: stopped}`, which `release` waits for;
- a sender whose layer source fails does the same by itself, and the reservation fails;
- a sender that goes away mid-transfer (connection closed): its queued writes finish within GPU
  time or die with its CUDA context; `release` returns `orphan_grace_s` after the close. A
  sender silent for `stop_timeout_s` after an `error` has its connection closed, then the same.
Refusals (unknown transfer, wrong blocks or layout) write nothing and keep the pair.

A sender keeps a pair's mapping until its last queued write ran, then lets torch close the IPC
handles. Both workers must see the same physical GPU (checked by UUID at hello); between GPUs
the nccl transport is the one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Mapping, Sequence
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
from kv_transfer.blocks import LayerScatter, block_index, check_layer
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
    DTYPES,
    TransferHeader,
    dtype_name,
    json_frame,
    read_json_frame,
    read_tensor_frame,
    reply_frame,
    tensor_frame_prefix,
    tensor_payload,
)

SCHEME = "cuda-ipc"
_POLLS = 3  # checks of a write's event on the loop before waiting on a thread (not more: the
# loop would hold the GIL against the engine's thread)


def gpu_uuid(device: torch.device) -> str:
    """The physical GPU behind `device`, the same in every process whatever it numbers it."""
    return str(torch.cuda.get_device_properties(device).uuid)


def export_cache(tensor: torch.Tensor) -> dict[str, Any]:
    """What another process needs to map `tensor` (on a GPU): torch's CUDA IPC description of
    it (`torch.multiprocessing.reductions.reduce_tensor`), as JSON."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor.detach())
    size, stride, offset, dtype = args[1], args[2], args[3], args[5]
    handle, storage_bytes, storage_offset = args[7], args[8], args[9]
    ref_handle, ref_offset, event_handle, event_sync = args[11], args[12], args[13], args[14]
    return {
        "shape": list(size),
        "stride": list(stride),
        "offset": offset,
        "dtype": dtype_name(dtype),
        "handle": handle.hex(),
        "storage_bytes": storage_bytes,
        "storage_offset": storage_offset,
        "ref_handle": ref_handle.hex(),
        "ref_offset": ref_offset,
        "event_handle": event_handle.hex() if event_handle else None,
        "event_sync": bool(event_sync),
    }


def import_cache(obj: Any, device: torch.device) -> torch.Tensor:
    """Map the tensor `export_cache` described in another process, on `device` (its GPU);
    `KVTransferError` for a malformed description or one CUDA cannot open."""
    try:
        shape, stride = [int(x) for x in obj["shape"]], [int(x) for x in obj["stride"]]
        ints = [obj[k] for k in ("offset", "storage_bytes", "storage_offset", "ref_offset")]
        if not all(type(x) is int and x >= 0 for x in ints):
            raise ValueError("offsets and sizes must be non-negative integers")
        offset, storage_bytes, storage_offset, ref_offset = ints
        dtype = DTYPES[obj["dtype"]]
        handle, ref_handle = bytes.fromhex(obj["handle"]), bytes.fromhex(obj["ref_handle"])
        event = obj["event_handle"]
        event_handle = bytes.fromhex(event) if event is not None else None
        event_sync = bool(obj["event_sync"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise KVTransferError(f"malformed KV cache export from the receiver: {exc!r}") from exc
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    try:
        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size(shape), tuple(stride), offset, torch.storage.TypedStorage,
            dtype, device.index, handle, storage_bytes, storage_offset, False, ref_handle,
            ref_offset, event_handle, event_sync,
        )  # fmt: skip
    except RuntimeError as exc:
        raise KVTransferError(f"cannot map the receiver's KV cache over CUDA IPC: {exc}") from exc


class _Pair(Pair):
    """The sender's side of one receiver: the control connection, the receiver's caches mapped
    into this process, a stream for the writes, one transfer at a time."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        caches: list[torch.Tensor],
        device: torch.device,
    ) -> None:
        super().__init__(reader, writer)
        self.caches = caches
        self.scatter = LayerScatter(caches)
        self.stream = torch.cuda.Stream(device)
        self.last_write: torch.cuda.Event | None = None  # recorded after the latest queued write

    def writing(self) -> bool:
        """True while a queued write may still run on the GPU."""
        return self.last_write is not None and not self.last_write.query()


class CudaIpcKVSender(PairedSender[_Pair]):
    """Sends KV from CUDA tensors into `CudaIpcKVReceiver`s on the same GPU, writing their
    reserved blocks directly; one control connection and one mapping per receiver. The layers
    must be contiguous CUDA tensors on this sender's device."""

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the cuda-ipc transport needs a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._retired: list[_Pair] = []  # ended, their last writes maybe still running
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cuda-ipc")

    async def close(self) -> None:
        """End every pair (sends in flight fail), then wait for their queued writes to run
        before the mappings go."""
        await super().close()
        for pair in self._retired:
            if pair.last_write is not None:
                await asyncio.get_running_loop().run_in_executor(
                    self._pool, pair.last_write.synchronize
                )
        self._retired.clear()
        self._pool.shutdown(wait=False)

    def _kill(self, pair: _Pair) -> None:
        """Close the pair's connection; its mapping stays until its queued writes ran."""
        pair.writer.transport.abort()
        self._retired = [p for p in self._retired if p.writing()]
        if pair.writing():
            self._retired.append(pair)

    async def _connect(self, endpoint: str) -> _Pair:
        """Connect, and map the receiver's caches."""
        host, port = parse_endpoint(endpoint, SCHEME)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(json_frame({"type": "hello", "gpu": gpu_uuid(self.device)}))
            await writer.drain()
            answer = await read_reply(reader)
            if answer["status"] != "ok":
                raise KVTransferError(answer.get("message") or f"hello refused: {answer!r}")
            exports = answer.get("caches")
            if not isinstance(exports, list) or not exports:
                raise KVTransferError(f"{endpoint}: the receiver exported no caches")
            caches = [import_cache(e, self.device) for e in exports]
        except BaseException:
            writer.transport.abort()
            raise
        return _Pair(reader, writer, caches, self.device)

    async def _transfer(
        self,
        pair: _Pair,
        spec: TransferSpec,
        layers: KVLayerSource,
        extras: Mapping[str, torch.Tensor],
    ) -> None:
        first = layers.layer(0)
        header = TransferHeader.describe(
            spec.transfer_id, spec.dst_block_ids, layers.num_layers, first, extras
        )
        try:  # what the receiver checks, before asking it; the pair stays in step
            self._check_layer(pair, spec, 0, first)
            num_blocks = pair.caches[0].shape[1]
            if any(not 0 <= b < num_blocks for b in spec.dst_block_ids):
                raise KVTransferError(
                    f"transfer {spec.transfer_id!r}: block ids out of the receiver's {num_blocks}"
                )
        except KVTransferError as exc:
            raise TransferRefused(str(exc)) from exc
        pair.writer.write(json_frame(header.to_json()))
        await pair.writer.drain()
        answer = await read_reply(pair.reader)
        if answer["status"] != "accept":
            raise TransferRefused(answer.get("message") or f"receiver answered {answer!r}")
        # The receiver answers once more: `error` as soon as the reservation ends, else after
        # our `done` or `stopped`.
        reply = asyncio.ensure_future(read_reply(pair.reader))
        try:
            failure: Exception | None = None
            try:
                await self._write(pair, spec, header, layers, first, reply)
            except Exception as exc:  # the layer source failed: stop cleanly, then raise it
                failure = exc
            if pair.last_write is not None:
                await self._ran(pair.last_write)
            if failure is None and not reply.done():
                pair.writer.write(json_frame({"type": "done"}))
                for meta in header.extras:
                    pair.writer.write(tensor_frame_prefix(extras[meta.name]))
                    pair.writer.write(tensor_payload(extras[meta.name]))
            else:
                why = repr(failure) if failure is not None else "the receiver ended it"
                pair.writer.write(json_frame({"type": "stopped", "message": why}))
            await pair.writer.drain()
            answer = await reply
        finally:
            reply.cancel()
        if failure is not None:
            raise failure
        if answer["status"] != "ok":
            raise TransferRefused(answer.get("message") or f"receiver answered {answer!r}")

    async def _write(
        self,
        pair: _Pair,
        spec: TransferSpec,
        header: TransferHeader,
        layers: KVLayerSource,
        first: torch.Tensor,
        reply: asyncio.Future[Any],
    ) -> None:
        """Queue each layer's write into the reserved blocks on the pair's stream, behind the
        layer's data (its export event, or the work queued on the producer's stream so far);
        stop queueing once the receiver answered."""
        stream, producer = pair.stream, torch.cuda.current_stream(self.device)
        with torch.cuda.stream(stream):
            index = block_index(spec.dst_block_ids, self.device)
        if not hasattr(layers, "ready"):  # computed already: every layer in one launch
            tensors = [first] + [layers.layer(i) for i in range(1, header.num_layers)]
            for i, tensor in enumerate(tensors):
                header.layer.check(tensor)
                self._check_layer(pair, spec, i, tensor)
            stream.wait_stream(producer)
            with torch.cuda.stream(stream):
                pair.scatter.each(0, index, tensors)
                for tensor in tensors:
                    tensor.record_stream(stream)
                pair.last_write = torch.cuda.Event()
                pair.last_write.record(stream)
            return
        for i in range(header.num_layers):
            await layer_ready(layers, i)
            if reply.done():
                return
            tensor = first if i == 0 else layers.layer(i)  # may be a copy queued just now
            header.layer.check(tensor)
            self._check_layer(pair, spec, i, tensor)
            event = layer_event(layers, i)
            if event is not None:
                stream.wait_event(event)
            else:
                stream.wait_stream(producer)  # the layer as of now
            with torch.cuda.stream(stream):  # torch's launch: less host time than Triton's
                pair.caches[i].index_copy_(1, index, tensor)
                tensor.record_stream(stream)  # the producer may free it once we return
                done = torch.cuda.Event()
                done.record(stream)
            pair.last_write = done

    async def _ran(self, event: torch.cuda.Event) -> None:
        """Wait until the GPU ran `event`: a few checks on the loop (a computed source's writes
        are often done by then), then on the sender's thread."""
        for _ in range(_POLLS):
            if event.query():
                return
            await asyncio.sleep(0)
        await asyncio.get_running_loop().run_in_executor(self._pool, event.synchronize)

    def _check_layer(self, pair: _Pair, spec: TransferSpec, i: int, tensor: torch.Tensor) -> None:
        """`KVTransferError` unless `tensor` can be written into layer `i` of the mapped caches
        (a write out of them would fault this process's CUDA context)."""
        if tensor.device != self.device or not tensor.is_contiguous():
            raise KVTransferError(
                f"transfer {spec.transfer_id!r}: layers must be contiguous on {self.device}"
            )
        if i >= len(pair.caches):
            raise KVTransferError(
                f"transfer {spec.transfer_id!r}: the receiver has {len(pair.caches)} layers"
            )
        num_blocks = len(spec.dst_block_ids)
        check_layer(spec.transfer_id, i, pair.caches[i], tensor.shape, tensor.dtype, num_blocks)


class CudaIpcKVReceiver(ListeningReceiver):
    """Receives CUDA IPC transfers into `kv_caches` (CUDA tensors of one GPU) from senders on
    that GPU; listens for control connections as `ListeningReceiver` does and advertises
    `cuda-ipc://advertise_host:port`.

    `stop_timeout_s`: how long a sender may take to stop writing once a reservation ended;
    `orphan_grace_s`: how long after a sender vanished mid-transfer its blocks stay held;
    `options` are `ListeningReceiver`'s (`header_timeout_s` 30 s by default here).
    """

    SCHEME = SCHEME

    def __init__(
        self,
        kv_caches: Sequence[torch.Tensor],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        stop_timeout_s: float = 30.0,
        orphan_grace_s: float = 2.0,
        **options: Any,
    ) -> None:
        options.setdefault("header_timeout_s", 30.0)
        self.device = cuda_device_of(kv_caches, "cuda-ipc")
        super().__init__(kv_caches, host, port, **options)
        self._gpu = gpu_uuid(self.device)
        self._stop_timeout_s = stop_timeout_s
        self._orphan_grace_s = orphan_grace_s

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Check the sender's GPU and export the caches to it, then serve its transfers."""
        hello = await self._first_frame(reader, writer)
        if not isinstance(hello, dict) or hello.get("type") != "hello":
            writer.write(reply_frame("error", "expected a hello frame naming the sender's GPU"))
            return
        if hello.get("gpu") != self._gpu:
            writer.write(
                reply_frame(
                    "error",
                    f"cuda-ipc needs the sender on the receiver's GPU ({self._gpu}), not on "
                    f"{hello.get('gpu')!r}: use the nccl transport between GPUs",
                )
            )
            return
        writer.write(json_frame({"status": "ok", "caches": self._exports()}))
        await writer.drain()
        while True:  # until the sender goes away, would not stop, or sent garbage
            await self._serve_one(await read_json_frame(reader), reader, writer)

    def _exports(self) -> list[dict[str, Any]]:
        """The caches, described for a sender to map (a fresh export per sender: each holds
        its own reference counts on them)."""
        return [export_cache(cache) for cache in self.kv_caches]

    async def _serve_one(
        self, obj: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One transfer: admit it, let the sender write, settle the reservation. Raises (the
        connection is then closed) when the sender vanished or would not stop."""
        admitted = self._admit(obj, writer)
        if admitted is None:  # refused: nothing was written, the pair carries on
            await writer.drain()
            return
        header, res = admitted
        loop = asyncio.get_running_loop()
        writing = self._writing[res.transfer_id] = loop.create_future()
        over = False  # the sender said its writes are over
        try:
            writer.write(reply_frame("accept"))
            await writer.drain()
            word, replied = await self._sender_word(res, reader, writer)
            over = True
            await self._settle(header, res, word, replied, reader, writer)
        except BaseException as exc:
            if self._table is not None:
                self._table.fail(
                    res, KVTransferError(f"transfer {res.transfer_id!r}: {exc!r}")
                )  # now: the owner learns at once; release waits for the grace
            raise
        finally:
            if over:
                self._written(res.transfer_id, writing)
            else:
                loop.call_later(self._orphan_grace_s, self._written, res.transfer_id, writing)

    def _written(self, transfer_id: str, writing: asyncio.Future[None]) -> None:
        """Nothing can write the transfer's blocks any more: `release` may return."""
        if self._writing.get(transfer_id) is writing:
            del self._writing[transfer_id]
        if not writing.done():
            writing.set_result(None)

    async def _sender_word(
        self, res: Reservation, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[dict[str, Any], bool]:
        """Wait for the sender's `done` or `stopped`; if the reservation ends first, answer
        `error` at once and wait for the sender to stop. Returns (the word, replied)."""
        word = asyncio.ensure_future(read_json_frame(reader))
        try:
            await asyncio.wait({word, res.future}, return_when=asyncio.FIRST_COMPLETED)
            replied = not word.done()
            if replied:  # cancelled, expired or closed: the sender must stop writing
                writer.write(reply_frame("error", res.end_reason()))
                await writer.drain()
                await asyncio.wait({word}, timeout=self._stop_timeout_s)
                if not word.done():
                    raise KVTransferError(
                        f"transfer {res.transfer_id!r}: the sender did not stop writing within "
                        f"{self._stop_timeout_s} s"
                    )
            msg = word.result()
        finally:
            word.cancel()
        if not isinstance(msg, dict) or msg.get("type") not in ("done", "stopped"):
            raise KVTransferError(f"transfer {res.transfer_id!r}: unexpected frame {msg!r}")
        return msg, replied

    async def _settle(
        self,
        header: TransferHeader,
        res: Reservation,
        word: dict[str, Any],
        replied: bool,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """The sender's writes are over: resolve (`done`) or fail (`stopped`) the reservation,
        and answer unless `replied` already."""
        assert self._table is not None
        if word["type"] == "done":
            extras: Extras = {}
            for meta in header.extras:
                extras[meta.name] = await read_tensor_frame(reader, meta)
            live = res.live
            self._table.complete(res, extras)
            reply = reply_frame("ok") if live else reply_frame("error", res.end_reason())
        else:
            why = word.get("message") or "no reason given"
            error = KVTransferError(f"transfer {res.transfer_id!r}: the sender stopped ({why})")
            self._table.fail(res, error)
            reply = reply_frame("error", str(error))
        if not replied:
            writer.write(reply)
            await writer.drain()

