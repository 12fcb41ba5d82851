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

With `layerwise` (`--layerwise-push`), the push starts before the prefill step runs and each
layer's KV goes as soon as the engine has computed it (engine.kv_export), so the transfer
overlaps the prefill's compute; the decode side receives the KV in the same layout either way.

With `target_follows`, the router reserves the decode side while this prompt computes (a
`fresh_blocks` reservation: every block is sent) and passes the target by `SetTarget`, which may
arrive before or after the Prefill call itself; a push waits for it (`TARGET_WAIT_S` at most).
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from engine.async_core import AsyncEngineCore
from engine.kv_export import LayerwiseExport
from engine.outputs import EngineCoreOutput
from engine.request import KVHandoff, Request
from kv_transfer.base import KVLayerSource, KVSender, KVTransferError, TransferSpec
from proto.baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker_common.convert import chunk_from_output, load_to_proto, request_from_proto
from worker_common.errors import unary
from worker_common.metrics import WorkerMetrics

log = logging.getLogger(__name__)

TARGET_WAIT_S = 30.0  # how long a target_follows Prefill waits for its SetTarget


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
    """Serves Prefill, Abort and GetLoad over one engine.

    Construct it on the event loop that serves it. With `layerwise`, the push of a prompt's KV
    starts before its prefill step runs and ships each layer as soon as the engine has computed
    it (engine.kv_export); otherwise the KV is copied after the step and pushed then.
    """

    def __init__(
        self,
        engine: AsyncEngineCore,
        sender: KVSender,
        metrics: WorkerMetrics,
        reply_before_push: bool = True,
        layerwise: bool = False,
    ) -> None:
        self.engine = engine
        self.sender = sender
        self.metrics = metrics
        self.reply_before_push = reply_before_push
        self.model = engine.core.config.model
        self.block_size = engine.core.config.cache.block_size
        self._pushes: set[asyncio.Task[tuple[int, float]]] = set()  # running background pushes
        # request id -> its target (resolved at once, or by SetTarget), while prefilling
        self._targets: dict[str, asyncio.Future[TransferSpec]] = {}
        # Layer-wise pushes by request id: the export, and its push unless the target is wrong.
        self._early: dict[str, tuple[LayerwiseExport, asyncio.Task[tuple[int, float]] | None]]
        self._early = {}
        self.layerwise = layerwise
        if layerwise:
            self._loop = asyncio.get_running_loop()
            engine.core.on_kv_export = self._on_export  # read on the engine thread
            engine.core.layerwise_export = True

    async def Prefill(self, request, context):  # noqa: N802 - gRPC method name
        return await unary(context, lambda: self._prefill(request))

    async def _prefill(self, msg: worker_pb2.PrefillRequest) -> worker_pb2.PrefillResponse:
        if msg.target_follows:
            if msg.target.endpoint or msg.target.block_ids or msg.target.num_cached_tokens:
                raise ValueError("target must be empty with target_follows (SetTarget sends it)")
            handoff = KVHandoff(num_cached_tokens=0)
        else:
            handoff = KVHandoff(msg.target.num_cached_tokens, _spec(msg.target))
        request = request_from_proto(msg.request, self.model, kv_transfer=handoff)
        rid = request.request_id
        if msg.target_follows:
            target = self._target(rid)
        else:
            target = asyncio.get_running_loop().create_future()
            target.set_result(handoff.target)
            self._targets[rid] = target
        try:
            return await self._run(request, target)
        finally:  # after the push took the target: a SetTarget may come after the first token
            if self._targets.get(rid) is target:
                del self._targets[rid]

    async def _run(
        self, request: Request, target: asyncio.Future[TransferSpec]
    ) -> worker_pb2.PrefillResponse:
        rid = request.request_id
        first: EngineCoreOutput | None = None
        async for out in self.engine.generate(request):
            if out.new_token_ids:
                first = out
        export, early = self._early.pop(rid, (None, None))
        if early is not None and (first is None or not first.handed_off):
            self._background(early, quiet=True)  # nothing waits for it: the decode side drops it
        if first is None:
            return worker_pb2.PrefillResponse(first=_aborted(rid))
        response = worker_pb2.PrefillResponse(first=chunk_from_output(first, request))
        if not first.handed_off:
            return response
        if export is None:
            # Put there on the engine thread before this output was delivered; a dict pop is
            # atomic, so no round trip to the engine thread is needed to take it.
            layers: KVLayerSource = CopiedLayers(self.engine.core.exports.pop(rid))
        else:
            layers = export
        try:
            _check_fit(await _wait_target(target), layers)
        except BaseException:
            if early is not None:
                self._background(early, quiet=True)  # it fails the same way
            raise
        push = early or asyncio.create_task(self._push(target, layers))
        if self.reply_before_push:
            self._background(push)
            response.kv_bytes = _nbytes(layers)
        else:
            try:
                response.kv_bytes, response.kv_seconds = await push
            except Exception:
                self.metrics.kv_transfer_failures.inc()
                raise
        return response

    async def SetTarget(self, request, context):  # noqa: N802 - gRPC method name
        return await unary(context, lambda: self._set_target(request))

    async def _set_target(self, msg: worker_pb2.PrefillTarget) -> worker_pb2.PrefillTargetAck:
        target = self._target(msg.request_id)
        if target.done():
            raise ValueError(f"request_id {msg.request_id!r} already has a target")
        target.set_result(_spec(msg.target))
        return worker_pb2.PrefillTargetAck()

    def _target(self, request_id: str) -> asyncio.Future[TransferSpec]:
        """The pending target of a target_follows request, made by whichever of Prefill and
        SetTarget comes first; one that no Prefill claims is forgotten after TARGET_WAIT_S."""
        target = self._targets.get(request_id)
        if target is None:
            loop = asyncio.get_running_loop()
            target = self._targets[request_id] = loop.create_future()
            loop.call_later(TARGET_WAIT_S * 2, self._forget_target, request_id, target)
        return target

    def _forget_target(self, request_id: str, target: asyncio.Future[TransferSpec]) -> None:
        if self._targets.get(request_id) is target:
            del self._targets[request_id]
        if not target.done():
            target.cancel()

    def _on_export(self, request_id: str, export: LayerwiseExport) -> None:
        """Engine thread, before the step that computes the KV: start its push on the loop."""
        self._loop.call_soon_threadsafe(self._start_push, request_id, export)

    def _start_push(self, request_id: str, export: LayerwiseExport) -> None:
        target = self._targets.get(request_id)
        if target is None:
            return  # the Prefill call is gone (cancelled): nobody to send it for
        self._early[request_id] = (export, asyncio.create_task(self._push(target, export)))

    async def _push(
        self, target: asyncio.Future[TransferSpec], layers: KVLayerSource
    ) -> tuple[int, float]:
        spec = await _wait_target(target)
        _check_fit(spec, layers)
        start = time.perf_counter()
        await self.sender.send(spec, layers)
        seconds = time.perf_counter() - start
        num_bytes = _nbytes(layers)
        self.metrics.kv_transfer_bytes.inc(num_bytes)
        self.metrics.kv_transfer_seconds.observe(seconds)
        return num_bytes, seconds

    def _background(self, task: asyncio.Task[tuple[int, float]], quiet: bool = False) -> None:
        """Let `task` finish on its own; a failure is counted and logged unless `quiet`."""
        self._pushes.add(task)

        def done(task: asyncio.Task[tuple[int, float]]) -> None:
            self._pushes.discard(task)
            if task.cancelled() or task.exception() is None or quiet:
                return
            self.metrics.kv_transfer_failures.inc()
            log.warning("KV push failed (the decode side fails the request): %s", task.exception())

        task.add_done_callback(done)

    async def Abort(self, request, context):  # noqa: N802
        return common_pb2.AbortResponse(
            num_aborted=await self.engine.abort(list(request.request_ids))
        )

    async def GetLoad(self, request, context):  # noqa: N802
        return load_to_proto(self.engine.load, "prefill", self.model, self.block_size)


def _spec(target: worker_pb2.KVTransferTarget) -> TransferSpec:
    return TransferSpec(
        transfer_id=target.transfer_id,
        endpoint=target.endpoint,
        dst_block_ids=tuple(target.block_ids),
        deadline=target.deadline,
    )


async def _wait_target(target: asyncio.Future[TransferSpec]) -> TransferSpec:
    try:
        return await asyncio.wait_for(asyncio.shield(target), TARGET_WAIT_S)
    except TimeoutError:
        raise KVTransferError(f"no KV target (SetTarget) within {TARGET_WAIT_S:.0f} s") from None


def _check_fit(spec: TransferSpec, layers: KVLayerSource) -> None:
    num_blocks = layers.layer(0).shape[1]
    if num_blocks != len(spec.dst_block_ids):
        raise ValueError(
            f"target.block_ids has {len(spec.dst_block_ids)} blocks, the prompt needs "
            f"{num_blocks} after the decode worker's cached tokens"
        )


def _nbytes(layers: KVLayerSource) -> int:
    return sum(layers.layer(i).numel() * layers.layer(i).element_size()
               for i in range(layers.num_layers))  # fmt: skip


def _aborted(request_id: str) -> common_pb2.TokenChunk:
    return common_pb2.TokenChunk(request_id=request_id, finish_reason="abort")


SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name
ADD_TO_SERVER = worker_pb2_grpc.add_PrefillWorkerServicer_to_server
