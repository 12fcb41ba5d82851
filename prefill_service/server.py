"""`baton.v1.PrefillWorker`: prefill a prompt, push its KV to the decode worker, return the
first token.

The engine runs the request with a `KVHandoff`: after its first token the request ends here and
the engine copies the KV of the blocks the decode worker does not hold yet (before those blocks
can be reused); this service then sends that copy through the KV sender. With prefix caching, a
later prompt sharing the prefix reuses the blocks.

The first token does not depend on the transfer, so by default the answer goes back as soon as
the push has started (`reply_before_push`): the transfer overlaps the router's first-token
delivery and its Decode call, and the decode worker waits for the KV before it decodes. A push
that fails then fails the decode side's reservation, so the request's Decode call fails (and is
counted in `baton:kv_transfer_failures`). `kv_seconds` in the answer is 0 in that mode; the
`baton:kv_transfer_seconds` histogram has the push times. With `reply_before_push=False` the
answer waits for the push (and a failed push fails the Prefill call).
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from engine.async_core import AsyncEngineCore
from engine.outputs import EngineCoreOutput
from engine.request import KVHandoff
from kv_transfer.base import KVSender, TransferSpec
from proto.baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker_common.convert import chunk_from_output, load_to_proto, request_from_proto
from worker_common.errors import unary
from worker_common.metrics import WorkerMetrics

log = logging.getLogger(__name__)


class CopiedLayers:
    """A `KVLayerSource` over per-layer tensors the engine already copied out."""

    def __init__(self, layers: list[torch.Tensor]) -> None:
        self._layers = layers

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer(self, i: int) -> torch.Tensor:
        return self._layers[i]


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    """Serves Prefill, Abort and GetLoad over one engine."""

    def __init__(
        self,
        engine: AsyncEngineCore,
        sender: KVSender,
        metrics: WorkerMetrics,
        reply_before_push: bool = True,
    ) -> None:
        self.engine = engine
        self.sender = sender
        self.metrics = metrics
        self.reply_before_push = reply_before_push
        self._pushes: set[asyncio.Task[tuple[int, float]]] = set()  # running background pushes
        self.model = engine.core.config.model
        self.block_size = engine.core.config.cache.block_size

    async def Prefill(self, request, context):  # noqa: N802 - gRPC method name
        return await unary(context, lambda: self._prefill(request))

    async def _prefill(self, msg: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        target = msg.target
        spec = TransferSpec(
            transfer_id=target.transfer_id,
            endpoint=target.endpoint,
            dst_block_ids=tuple(target.block_ids),
            deadline=target.deadline,
        )
        handoff = KVHandoff(num_cached_tokens=target.num_cached_tokens, target=spec)
        request = request_from_proto(msg.request, self.model, kv_transfer=handoff)
        first: EngineCoreOutput | None = None
        async for out in self.engine.generate(request):
            if out.new_token_ids:
                first = out
        if first is None:
            return worker_pb2.PrefillResponse(first=_aborted(request.request_id))
        response = worker_pb2.PrefillResponse(first=chunk_from_output(first, request))
        if first.handed_off:
            layers = await self.engine.call(lambda core: core.exports.pop(request.request_id))
            if len(layers[0][0]) != len(spec.dst_block_ids):
                raise ValueError(
                    f"target.block_ids has {len(spec.dst_block_ids)} blocks, the prompt needs "
                    f"{len(layers[0][0])} after the decode worker's cached tokens"
                )
            if self.reply_before_push:
                task = asyncio.create_task(self._push(spec, layers))
                self._pushes.add(task)
                task.add_done_callback(self._push_done)
                response.kv_bytes = sum(t.numel() * t.element_size() for t in layers)
            else:
                response.kv_bytes, response.kv_seconds = await self._push(spec, layers)
        return response

    async def _push(self, spec: TransferSpec, layers: list[torch.Tensor]) -> tuple[int, float]:
        start = time.perf_counter()
        try:
            await self.sender.send(spec, CopiedLayers(layers))
        except Exception:
            self.metrics.kv_transfer_failures.inc()
            raise
        seconds = time.perf_counter() - start
        num_bytes = sum(t.numel() * t.element_size() for t in layers)
        self.metrics.kv_transfer_bytes.inc(num_bytes)
        self.metrics.kv_transfer_seconds.observe(seconds)
        return num_bytes, seconds

    def _push_done(self, task: asyncio.Task[tuple[int, float]]) -> None:
        self._pushes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("KV push failed (the decode side fails the request): %s", task.exception())

    async def Abort(self, request, context):  # noqa: N802
        return common_pb2.AbortResponse(
            num_aborted=await self.engine.abort(list(request.request_ids))
        )

    async def GetLoad(self, request, context):  # noqa: N802
        return load_to_proto(self.engine.load, "prefill", self.model, self.block_size)


def _aborted(request_id: str) -> common_pb2.TokenChunk:
    return common_pb2.TokenChunk(request_id=request_id, finish_reason="abort")


SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name
ADD_TO_SERVER = worker_pb2_grpc.add_PrefillWorkerServicer_to_server
