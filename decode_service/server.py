"""`baton.v1.DecodeWorker` and `baton.v1.ColocatedWorker` over one engine.

Decode: `Reserve` holds blocks for a prompt (reusing this worker's own prefix cache) through the
engine's "receive" KV connector (engine.kv_connector.receive) and registers the transfer with the
KV receiver; the lease ends at a deadline, after which the blocks are freed if no `Decode`
claimed them. `Decode` waits until the KV is in place, then reports it to the connector, with the
first token the prefill worker sampled and the extra tensors that came with the KV: the request
joins the running batch, and the rest streams back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from engine.async_core import AsyncEngineCore
from engine.core import EngineCore
from engine.kv_connector import KVConnectorConfig, make_kv_connector
from engine.kv_connector.receive import ReceiveConnector, Reservation
from engine.outputs import EngineCoreOutput
from engine.request import Request
from kv_transfer.base import KVReceiver
from proto.baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker_common.convert import chunk_from_output, load_to_proto, request_from_proto
from worker_common.errors import streaming, unary
from worker_common.metrics import WorkerMetrics

MAX_LEASE_S = 600.0


@dataclass(eq=False)
class _Lease:
    request: Request
    kv_arrived: asyncio.Future[dict[str, torch.Tensor]]  # the receiver's: resolves with extras
    expiry: asyncio.TimerHandle | None = None


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    """Serves Reserve, Decode, Generate, Abort and GetLoad.

    `await start()` before serving: it installs the receive KV connector in the engine and
    starts the KV receiver that `make_receiver(kv_caches)` makes over the engine's caches."""

    def __init__(
        self,
        engine: AsyncEngineCore,
        make_receiver: Callable[[list[torch.Tensor]], KVReceiver],
        metrics: WorkerMetrics,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model = engine.config.model
        self.block_size = engine.config.cache.block_size
        self.leases: dict[str, _Lease] = {}
        connector = make_kv_connector(KVConnectorConfig("receive"), engine.config)
        assert isinstance(connector, ReceiveConnector)
        self.connector = connector
        self._make_receiver = make_receiver
        self._receiver: KVReceiver | None = None

    @property
    def receiver(self) -> KVReceiver:
        """The KV receiver (once `start()` returned)."""
        assert self._receiver is not None, "DecodeServicer.start() first"
        return self._receiver

    async def start(self) -> None:
        """Install the connector (on the engine thread), then start the receiver over the
        caches it registered."""
        await self.engine.call(lambda core: core.set_kv_connector(self.connector))
        self._receiver = self._make_receiver(self.connector.kv_caches)
        await self._receiver.start()

    async def Reserve(self, request, context):  # noqa: N802 - gRPC method name
        return await unary(context, lambda: self._reserve(request))

    async def _reserve(self, msg: worker_pb2.ReserveRequest) -> worker_pb2.Reservation:
        if not 0 < msg.lease_seconds <= MAX_LEASE_S:
            raise ValueError(
                f"lease_seconds must be in (0, {MAX_LEASE_S}], got {msg.lease_seconds}"
            )
        request = request_from_proto(msg.request, self.model)
        rid = request.request_id
        if rid in self.leases:
            raise ValueError(f"request_id {rid!r} already has a reservation")
        reuse = not msg.fresh_blocks

        def reserve(core: EngineCore) -> Reservation:
            return self.connector.reserve(core, request, reuse)

        reservation = await self.engine.call(reserve)
        block_ids = list(reservation.block_ids)
        deadline = time.time() + msg.lease_seconds
        lease = _Lease(request, self.receiver.expect(rid, block_ids, deadline))
        self.leases[rid] = lease
        loop = asyncio.get_running_loop()
        lease.expiry = loop.call_later(msg.lease_seconds, self._expire, rid)
        target = worker_pb2.KVTransferTarget(
            transfer_id=rid,
            endpoint=self.receiver.endpoint,
            block_ids=block_ids,
            num_cached_tokens=reservation.num_cached_tokens,
            deadline=deadline,
        )
        return worker_pb2.Reservation(target=target)

    def _expire(self, request_id: str) -> None:
        if self.leases.pop(request_id, None) is not None:
            asyncio.ensure_future(self._release(request_id))

    async def _release(self, request_id: str) -> int:
        """Drop the reservation, and free its blocks once no transfer can still write them."""
        await self.receiver.release(request_id)
        return await self.engine.abort([request_id])

    async def Decode(self, request, context):  # noqa: N802
        async for chunk in streaming(context, lambda: self._decode(request)):
            yield chunk

    async def _decode(self, msg: worker_pb2.DecodeRequest):
        lease = self.leases.pop(msg.request_id, None)
        if lease is None:
            raise KeyError(f"no reservation for request_id {msg.request_id!r} (expired or aborted)")
        if lease.expiry is not None:
            lease.expiry.cancel()
        rid, first = msg.request_id, msg.first_token_id
        try:
            extras = await lease.kv_arrived
        except asyncio.CancelledError:
            await self._release(rid)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this call was cancelled
            raise KeyError(f"reservation {rid!r} was aborted before its KV arrived") from None
        except BaseException:
            await self._release(rid)
            raise

        def kv_arrived(core: EngineCore) -> None:
            self.connector.kv_arrived(rid, [first], extras)

        outputs = self.engine.stream(rid, kv_arrived)
        async for chunk in with_final_chunk(outputs, lease.request, rid):
            yield chunk

    async def Generate(self, request, context):  # noqa: N802
        async for chunk in streaming(context, lambda: generate_locally(self.engine, request)):
            yield chunk

    async def Abort(self, request, context):  # noqa: N802
        ids = list(request.request_ids)
        for rid in ids:
            lease = self.leases.pop(rid, None)
            if lease is not None and lease.expiry is not None:
                lease.expiry.cancel()
            # Also a transfer a Decode call waits for (its lease is taken): no write may land
            # in the blocks once they are freed (a no-op for a transfer already done).
            await self.receiver.release(rid)
        return common_pb2.AbortResponse(num_aborted=await self.engine.abort(ids))

    async def GetLoad(self, request, context):  # noqa: N802
        return load_to_proto(self.engine.load, "decode", self.model, self.block_size)


class ColocatedServicer(worker_pb2_grpc.ColocatedWorkerServicer):
    """Prefill and decode in one engine: Generate streams every token, the first included."""

    def __init__(self, engine: AsyncEngineCore, metrics: WorkerMetrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model = engine.config.model
        self.block_size = engine.config.cache.block_size

    async def Generate(self, request, context):  # noqa: N802
        async for chunk in streaming(context, lambda: generate_locally(self.engine, request)):
            yield chunk

    async def Abort(self, request, context):  # noqa: N802
        return common_pb2.AbortResponse(
            num_aborted=await self.engine.abort(list(request.request_ids))
        )

    async def GetLoad(self, request, context):  # noqa: N802
        return load_to_proto(self.engine.load, "colocated", self.model, self.block_size)


async def generate_locally(engine: AsyncEngineCore, msg: worker_pb2.WorkerRequest):
    """Prefill and decode `msg` in this worker's engine; every token, the first included."""
    request = request_from_proto(msg, engine.config.model)
    async for chunk in with_final_chunk(engine.generate(request), request, msg.request_id):
        yield chunk


async def with_final_chunk(outputs: AsyncIterator[EngineCoreOutput], request, request_id: str):
    """Chunks for `outputs`, closed by an "abort" chunk if the engine dropped the request."""
    finished = False
    async for out in outputs:
        finished = out.finished
        yield chunk_from_output(out, request)
    if not finished:
        yield common_pb2.TokenChunk(request_id=request_id, finish_reason="abort")


def _service_name(name: str) -> str:
    return worker_pb2.DESCRIPTOR.services_by_name[name].full_name


DECODE_SERVICE_NAME = _service_name("DecodeWorker")
COLOCATED_SERVICE_NAME = _service_name("ColocatedWorker")
