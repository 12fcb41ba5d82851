"""KV transfer over TCP (asyncio streams): between hosts, or between processes on CPU.

One connection per transfer, opened by `send` and closed when it returns. A prompt's KV is
megabytes and its prefill takes far longer than a handshake, so pooling would save little, while
a private connection keeps concurrent transfers independent (no head-of-line blocking) and makes
"the connection broke" mean exactly "this transfer failed". The frames are in `kv_transfer.wire`.

Receiver side: each layer is read into a reusable CPU buffer, then written into
`kv_caches[layer][:, dst_block_ids]` with one `index_copy_`, on the event loop thread, right
after checking the reservation is still live. The header is checked against the caches before
anything is accepted, so a refused transfer writes nothing.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import torch

from kv_transfer.base import (
    KVLayerSource,
    KVReceiver,
    KVSender,
    KVTransferError,
    TransferRefused,
    TransferSpec,
    check_send,
    layer_ready,
)
from kv_transfer.blocks import check_layer, scatter_layer
from kv_transfer.reservations import Extras, Reservation, ReservationTable
from kv_transfer.wire import (
    TransferHeader,
    json_frame,
    read_json_frame,
    read_tensor_frame,
    reply_frame,
    tensor_frame_prefix,
    tensor_payload,
)

CONNECTION_ERRORS = (OSError, asyncio.IncompleteReadError)  # the peer is gone (TimeoutError too)


def parse_endpoint(endpoint: str, scheme: str = "tcp") -> tuple[str, int]:
    """`scheme://host:port` (IPv6 hosts in brackets) -> (host, port); `KVTransferError`
    otherwise."""
    parts = urlsplit(endpoint)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != scheme or not parts.hostname or port is None:
        raise KVTransferError(f"not a {scheme} endpoint: {endpoint!r}")
    return parts.hostname, port


@asynccontextmanager
async def send_errors(spec: TransferSpec, seconds: float) -> AsyncIterator[None]:
    """Run a send's body for at most `seconds`; its timeout and a broken connection come out as
    `KVTransferError`s naming the transfer."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise KVTransferError(f"transfer {spec.transfer_id!r}: deadline passed") from exc
    except CONNECTION_ERRORS as exc:
        raise KVTransferError(
            f"transfer {spec.transfer_id!r}: connection to {spec.endpoint} failed: {exc!r}"
        ) from exc


def cuda_device_of(kv_caches: Sequence[torch.Tensor], transport: str) -> torch.device:
    """The GPU of `kv_caches`; `ValueError` naming `transport` if they are not on one."""
    device = kv_caches[0].device if kv_caches else torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"the {transport} transport needs CUDA caches, got {device}")
    return device


def format_endpoint(host: str, port: int) -> str:
    """(host, port) -> `tcp://host:port`, bracketing IPv6 hosts."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


async def read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    """One receiver reply frame: a JSON object with a string `status`."""
    obj = await read_json_frame(reader)
    if not isinstance(obj, dict) or not isinstance(obj.get("status"), str):
        raise KVTransferError(f"malformed reply from receiver: {obj!r}")
    return obj


async def _read_reply(reader: asyncio.StreamReader) -> tuple[str, str]:
    """One receiver reply frame as (status, message)."""
    obj = await read_reply(reader)
    return obj["status"], str(obj.get("message", ""))


def check_header(
    header: TransferHeader,
    res: Reservation,
    kv_caches: Sequence[torch.Tensor],
    max_extra_bytes: int,
) -> None:
    """`KVTransferError` unless the sender's header fits the reservation and the caches."""
    res.check_blocks(header.dst_block_ids)
    meta, num_blocks = header.layer, res.block_ids.numel()
    if header.num_layers != len(kv_caches):
        raise KVTransferError(
            f"transfer {res.transfer_id!r}: sender has {header.num_layers} layers, "
            f"receiver has {len(kv_caches)}"
        )
    for i, cache in enumerate(kv_caches):
        check_layer(res.transfer_id, i, cache, meta.shape, meta.dtype, num_blocks)
    extra_bytes = sum(m.nbytes for m in header.extras)
    if extra_bytes > max_extra_bytes:
        raise KVTransferError(
            f"transfer {res.transfer_id!r}: extras of {extra_bytes} bytes exceed "
            f"max_extra_bytes={max_extra_bytes}"
        )


def _consume_exception(task: asyncio.Future[Any]) -> None:
    """Mark a background task's exception as seen: the caller reports the failure itself."""
    if not task.cancelled():
        task.exception()


class TcpKVSender(KVSender):
    """Sends transfers to `TcpKVReceiver`s, one connection per `send`.

    `reply_grace_s` (seconds) bounds the wait for the receiver's reason once it has cut the
    connection mid-stream.
    """

    def __init__(self, *, reply_grace_s: float = 1.0) -> None:
        self._reply_grace_s = reply_grace_s
        self._writers: set[asyncio.StreamWriter] = set()
        self._closed = False

    async def send(
        self,
        spec: TransferSpec,
        layers: KVLayerSource,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """See `KVSender.send`; the whole exchange runs under `spec.deadline`."""
        left = check_send(self._closed, spec, layers)
        host, port = parse_endpoint(spec.endpoint)
        async with send_errors(spec, left):
            await self._exchange(spec, host, port, layers, extra or {})

    async def close(self) -> None:
        """Abort the connections of sends in flight (they raise) and refuse new sends."""
        self._closed = True
        for writer in list(self._writers):
            writer.transport.abort()

    async def _exchange(
        self,
        spec: TransferSpec,
        host: str,
        port: int,
        layers: KVLayerSource,
        extras: Mapping[str, torch.Tensor],
    ) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        self._writers.add(writer)
        try:
            first = layers.layer(0)
            header = TransferHeader.describe(
                spec.transfer_id, spec.dst_block_ids, layers.num_layers, first, extras
            )
            writer.write(json_frame(header.to_json()))
            await writer.drain()
            status, message = await _read_reply(reader)
            if status != "accept":
                raise KVTransferError(message or f"receiver answered {status!r} to the header")
            await self._stream_and_confirm(reader, writer, header, layers, first, extras)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _stream_and_confirm(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        header: TransferHeader,
        layers: KVLayerSource,
        first: torch.Tensor,
        extras: Mapping[str, torch.Tensor],
    ) -> None:
        # The receiver replies once: "ok" after the last frame, or "error" at any time. Reading
        # that reply concurrently lets a refusal stop the stream at the next layer.
        reply = asyncio.create_task(_read_reply(reader))
        reply.add_done_callback(_consume_exception)
        try:
            try:
                await self._stream(writer, header, layers, first, extras, reply)
            except CONNECTION_ERRORS:  # the receiver may have cut us off: prefer its reason
                await asyncio.wait({reply}, timeout=self._reply_grace_s)
                if not reply.done() or reply.exception() is not None:
                    raise
            status, message = await reply
        finally:
            reply.cancel()
        if status != "ok":
            raise KVTransferError(message or f"receiver answered {status!r}")

    @staticmethod
    async def _stream(
        writer: asyncio.StreamWriter,
        header: TransferHeader,
        layers: KVLayerSource,
        first: torch.Tensor,
        extras: Mapping[str, torch.Tensor],
        reply: asyncio.Task[tuple[str, str]],
    ) -> None:
        for i in range(header.num_layers):
            await layer_ready(layers, i)
            if reply.done():
                return
            tensor = first if i == 0 else layers.layer(i)
            header.layer.check(tensor)
            writer.write(tensor_frame_prefix(tensor))
            writer.write(tensor_payload(tensor))
            await writer.drain()
        for meta in header.extras:
            writer.write(tensor_frame_prefix(extras[meta.name]))
            writer.write(tensor_payload(extras[meta.name]))
        await writer.drain()


class Pair:
    """A sender's link to one receiver: the control connection; one transfer at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.lock = asyncio.Lock()
        self.broken = False


P = TypeVar("P", bound=Pair)


class PairedSender(KVSender, Generic[P]):
    """What senders with a lasting link per receiver share (nccl, cuda-ipc): the pairs by
    endpoint, made on first use (`_connect`), each carrying one transfer at a time
    (`_transfer`). A transfer that fails other than by a clean refusal (`TransferRefused`) ends
    its pair (`_kill`); the next send to that endpoint makes a new one."""

    def __init__(self) -> None:
        self._pairs: dict[str, P] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._closed = False

    async def send(
        self,
        spec: TransferSpec,
        layers: KVLayerSource,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """See `KVSender.send`; the whole exchange runs under `spec.deadline`."""
        left = check_send(self._closed, spec, layers)
        async with send_errors(spec, left):
            pair = await self._pair(spec.endpoint)
            async with pair.lock:
                if pair.broken:
                    raise KVTransferError(f"connection to {spec.endpoint} was lost")
                try:
                    await self._transfer(pair, spec, layers, extra or {})
                except TransferRefused:
                    raise  # a clean refusal: the pair stays in step
                except BaseException:
                    self._drop(spec.endpoint, pair)  # before `layers` can be freed
                    raise

    async def close(self) -> None:
        """End every pair; sends in flight fail."""
        self._closed = True
        for endpoint in list(self._pairs):
            self._drop(endpoint)

    def _drop(self, endpoint: str, pair: P | None = None) -> None:
        """End the endpoint's pair (or `pair`, if it is still the endpoint's)."""
        if pair is None or self._pairs.get(endpoint) is pair:
            pair = self._pairs.pop(endpoint, None) or pair
        if pair is not None:
            pair.broken = True
            self._kill(pair)

    async def _pair(self, endpoint: str) -> P:
        """The live pair for `endpoint`, connecting on first use, and again once the receiver
        closed the connection between transfers (it restarted, say)."""
        lock = self._connecting.setdefault(endpoint, asyncio.Lock())
        async with lock:
            pair = self._pairs.get(endpoint)
            if pair is not None and not pair.broken:
                if not pair.reader.at_eof():
                    return pair
                self._drop(endpoint, pair)
            pair = self._pairs[endpoint] = await self._connect(endpoint)
            return pair

    @abstractmethod
    async def _connect(self, endpoint: str) -> P:
        """A new pair with the receiver at `endpoint`, ready for transfers."""

    @abstractmethod
    async def _transfer(
        self, pair: P, spec: TransferSpec, layers: KVLayerSource, extras: Mapping[str, torch.Tensor]
    ) -> None:
        """One transfer over `pair`; `TransferRefused` when the pair stays usable."""

    @abstractmethod
    def _kill(self, pair: P) -> None:
        """Tear `pair` down (it is marked broken already)."""


class ListeningReceiver(KVReceiver):
    """What every receiver with a TCP listener shares (tcp here; nccl and cuda-ipc for their
    control planes):
    the reservation table, the listening socket, connection bookkeeping, header admission.

    Binds `host:port` (port 0 picks a free one) and advertises `SCHEME://advertise_host:port`
    (`advertise_host` defaults to `host`). A header must arrive within `header_timeout_s`
    seconds of a connection; a transfer's `extra` tensors may total at most `max_extra_bytes`.
    Subclasses serve one connection in `_serve`.
    """

    SCHEME = "tcp"

    def __init__(
        self,
        kv_caches: Sequence[torch.Tensor],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        advertise_host: str | None = None,
        header_timeout_s: float = 10.0,
        max_extra_bytes: int = 64 << 20,
    ) -> None:
        if not kv_caches:
            raise ValueError("kv_caches is empty")
        self.kv_caches = list(kv_caches)
        self._host, self._port = host, port
        self._advertise_host = advertise_host or host
        self._header_timeout_s = header_timeout_s
        self._max_extra_bytes = max_extra_bytes
        self._endpoint: str | None = None
        self._server: asyncio.Server | None = None
        self._table: ReservationTable | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        # transfer id -> resolved once no write of it can still land (queued GPU writes)
        self._writing: dict[str, asyncio.Future[None]] = {}

    @property
    def endpoint(self) -> str:
        """`SCHEME://host:port` with the bound port; `RuntimeError` before `start()`."""
        if self._endpoint is None:
            raise RuntimeError(f"{type(self).__name__}.endpoint is known only after start()")
        return self._endpoint

    async def start(self) -> None:
        """Bind and listen; reservations are made on this event loop from now on."""
        self._table = ReservationTable(self.kv_caches[0].shape[1], asyncio.get_running_loop())
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        port = self._server.sockets[0].getsockname()[1]
        address = format_endpoint(self._advertise_host, port).removeprefix("tcp://")
        self._endpoint = f"{self.SCHEME}://{address}"

    def expect(
        self, transfer_id: str, dst_block_ids: Sequence[int], deadline: float
    ) -> asyncio.Future[Extras]:
        """See `KVReceiver.expect`; `RuntimeError` before `start()`."""
        if self._table is None:
            raise RuntimeError(f"{type(self).__name__}.expect called before start()")
        return self._table.add(transfer_id, dst_block_ids, deadline)

    def cancel(self, transfer_id: str) -> None:
        """See `KVReceiver.cancel`."""
        if self._table is not None:
            self._table.cancel(transfer_id)

    async def release(self, transfer_id: str) -> None:
        """See `KVReceiver.release`: waits for the GPU writes a subclass marked in flight."""
        self.cancel(transfer_id)
        writing = self._writing.get(transfer_id)
        if writing is not None:
            await asyncio.shield(writing)

    async def close(self) -> None:
        """Stop listening, fail pending reservations and drop every open connection."""
        if self._server is None or self._table is None:
            return
        self._server.close()
        self._table.close("receiver closed")
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except (*CONNECTION_ERRORS, KVTransferError):
            pass  # the sender went away or broke the protocol; its reservation was failed
        finally:
            self._handlers.discard(task)
            writer.close()

    @abstractmethod
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one sender's connection until it is done."""

    async def _first_frame(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Any:
        """A connection's first JSON frame, within `header_timeout_s`; an unreadable one is
        answered with an error and raises `KVTransferError` (the connection then closes)."""
        try:
            return await asyncio.wait_for(read_json_frame(reader), self._header_timeout_s)
        except KVTransferError as exc:
            writer.write(reply_frame("error", str(exc)))
            raise

    def _admit(
        self, obj: Any, writer: asyncio.StreamWriter
    ) -> tuple[TransferHeader, Reservation] | None:
        """Check a received header and claim its reservation; None (an error reply written)
        when the transfer is refused."""
        try:
            header = TransferHeader.from_json(obj)
            return header, self._claim(header)
        except KVTransferError as exc:
            writer.write(reply_frame("error", str(exc)))
            return None

    def _claim(self, header: TransferHeader) -> Reservation:
        """Claim the reservation `header` names and check the header against it and the
        caches; `KVTransferError` (the reservation, if claimed, failed) when it is refused."""
        assert self._table is not None
        res = self._table.claim(header.transfer_id)
        try:
            check_header(header, res, self.kv_caches, self._max_extra_bytes)
        except KVTransferError as exc:
            self._table.fail(res, exc)
            raise
        return res


class TcpKVReceiver(ListeningReceiver):
    """Receives transfers over TCP straight into `kv_caches` (one tensor per layer), one
    connection per transfer (see `ListeningReceiver` for the arguments).

    Frames arrive in CPU memory and are copied to the caches' device (CPU in practice).
    """

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        admitted = self._admit(await self._first_frame(reader, writer), writer)
        if admitted is None:
            return
        header, res = admitted
        writer.write(reply_frame("accept"))
        error = await self._receive(reader, header, res)
        writer.write(reply_frame("error", error) if error else reply_frame("ok"))
        await writer.drain()

    async def _receive(
        self, reader: asyncio.StreamReader, header: TransferHeader, res: Reservation
    ) -> str | None:
        """Read every frame into the caches; resolve or fail `res`. Returns the error, if any."""
        assert self._table is not None
        data = asyncio.create_task(self._read_frames(reader, header, res))
        data.add_done_callback(_consume_exception)
        try:
            await asyncio.wait({data, res.future}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            data.cancel()
        if not res.live:  # cancelled, expired or receiver closed meanwhile
            return res.end_reason()
        exc = data.exception()
        if exc is None:
            self._table.complete(res, data.result())
            return None
        if not isinstance(exc, KVTransferError):
            exc = KVTransferError(f"transfer {res.transfer_id!r}: connection lost ({exc!r})")
        self._table.fail(res, exc)
        return str(exc)

    async def _read_frames(
        self, reader: asyncio.StreamReader, header: TransferHeader, res: Reservation
    ) -> Extras:
        buffer = torch.empty(header.layer.nbytes, dtype=torch.uint8)
        for i, cache in enumerate(self.kv_caches):
            try:
                layer = await read_tensor_frame(reader, header.layer, buffer)
            except CONNECTION_ERRORS as exc:
                raise KVTransferError(
                    f"transfer {res.transfer_id!r}: connection lost in layer {i} ({exc!r})"
                ) from exc
            if not res.live:
                raise KVTransferError(res.end_reason())
            scatter_layer(cache, res.block_ids, layer)  # (2, n, block_size, Hkv, D)
        extras: Extras = {}
        for meta in header.extras:
            extras[meta.name] = await read_tensor_frame(reader, meta)
        return extras
