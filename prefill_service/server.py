"""`baton.v1.PrefillWorker`: prefill a prompt, push its KV to the decode worker, return the
first token.

The engine runs the request with a `KVHandoff` and the "push" KV connector
(engine.kv_connector.push): after its first token the request ends here, and the step that
computed its prompt saved a copy of the KV of the blocks the decode worker does not hold yet;
this service sends that copy through the KV sender. With prefix caching, a later prompt sharing
the prefix reuses the blocks.

The first token does not depend on the transfer, so by default the answer goes back as soon as
the push has started (`reply_before_push`): the transfer overlaps the router's first-token
delivery and its Decode call, and the decode worker waits for the KV before it decodes. A push
that fails then fails the decode side's reservation, so the request's Decode call fails (and is
counted in `baton:kv_transfer_failures`). `kv_seconds` in the answer is 0 in that mode; the
`baton:kv_transfer_seconds` histogram has the push times. With `reply_before_push=False` the
answer waits for the push (and a failed push fails the Prefill call).

With `layerwise` (`--layerwise-push`), the push starts before the prefill step runs and each
layer's KV goes as soon as the engine has computed it (engine.kv_connector.layerwise), so the
transfer overlaps the prefill's compute; the decode side receives the KV in the same layout either
way. Extra tensors the connector saves with the KV (`KVSave.extras`) travel after it.

With `target_follows`, the router reserves the decode side while this prompt computes (a
`fresh_blocks` reservation: every block is sent) and passes the target by `SetTarget`, which may
arrive before or after the Prefill call itself; a push waits for it (`TARGET_WAIT_S` at most).
"""

from __future__ import annotations

import asyncio
import logging
import time

from engine.async_core import AsyncEngineCore
from engine.kv_connector import KVConnectorConfig, make_kv_connector
from engine.kv_connector.push import CopiedLayers, KVSave
from engine.outputs import EngineCoreOutput
from engine.request import KVHandoff, Request
from kv_transfer.base import KVLayerSource, KVSender, KVTransferError, TransferSpec
from proto.baton.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker_common.convert import (
    check_output,
    chunk_from_output,
    load_to_proto,
    request_from_proto,
)
from worker_common.errors import unary
from worker_common.metrics import WorkerMetrics

log = logging.getLogger(__name__)

TARGET_WAIT_S = 30.0  # how long a target_follows Prefill waits for its SetTarget


__all__ = ["CopiedLayers", "PrefillServicer"]  # CopiedLayers: bench imports it from here


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    """Serves Prefill, SetTarget, Abort and GetLoad over one engine.

    Construct it on the event loop that serves it, then `await start()` (it installs the push
    KV connector in the engine). With `layerwise`, the push of a prompt's KV starts before its
    prefill step runs and ships each layer as soon as the engine has computed it; otherwise the
    KV is copied after the step and pushed once the first token says the request is handed off.
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
        self.model = engine.config.model
        self.block_size = engine.config.cache.block_size
        self._loop = asyncio.get_running_loop()
        self._pushes: set[asyncio.Task[tuple[int, float]]] = set()  # running background pushes
        # request id -> its target (resolved at once, or by SetTarget), while prefilling
        self._targets: dict[str, asyncio.Future[TransferSpec]] = {}
        # Saves the engine announced, by request id, with their push if it started already.
        self._saves: dict[str, tuple[KVSave, asyncio.Task[tuple[int, float]] | None]] = {}
        self.layerwise = layerwise
        options = {"layerwise": layerwise, "on_save": self._on_save}
        self.connector = make_kv_connector(KVConnectorConfig("push", options), engine.config)

    async def start(self) -> None:
        """Install the push connector in the engine (on its thread, as every engine call)."""
        await self.engine.call(lambda core: core.set_kv_connector(self.connector))

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
            self._drop_save(rid)  # the call ended before it took its save (cancelled)

    async def _run(
        self, request: Request, target: asyncio.Future[TransferSpec]
    ) -> worker_pb2.PrefillResponse:
        rid = request.request_id
        first: EngineCoreOutput | None = None
        async for out in self.engine.generate(request):
            check_output(out)  # a grammar that did not compile: INVALID_ARGUMENT
            if out.new_token_ids:
                first = out
        if first is None or not first.handed_off:
            self._drop_save(rid)  # the first token finished it (or it was aborted): no push
        if first is None:
            return worker_pb2.PrefillResponse(first=_aborted(rid))
        response = worker_pb2.PrefillResponse(first=chunk_from_output(first, request))
        if not first.handed_off:
            return response
        # The save was announced on the loop before this output was delivered (both come from
        # the engine thread, in that order, by call_soon_threadsafe).
        entry = self._saves.pop(rid, None)
        if entry is None:
            raise RuntimeError(f"request {rid!r} was handed off without a KV save")
        save, early = entry
        try:
            _check_fit(await _wait_target(target), save.layers)
        except BaseException:
            if early is not None:
                self._background(early, quiet=True)  # it fails the same way
            raise
        push = early or asyncio.create_task(self._push(target, save))
        if self.reply_before_push:
            self._background(push)
            response.kv_bytes = _nbytes(save.layers)
        else:
            try:
                response.kv_bytes, response.kv_seconds = await push
            except Exception:
                self.metrics.kv_transfer_failures.inc()
                raise
        return response

    def _drop_save(self, request_id: str) -> None:
        """Forget the request's save; a push of it already under way ends on its own (the
        decode side refuses or drops it), quietly: nothing waits for it."""
        _, early = self._saves.pop(request_id, (None, None))
        if early is not None:
            self._background(early, quiet=True)

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

    def _on_save(self, save: KVSave) -> None:
        """Engine thread, during the step that takes the save: hand it to the loop."""
        self._loop.call_soon_threadsafe(self._saved, save)

    def _saved(self, save: KVSave) -> None:
        """Keep the save for the Prefill call; a layer-wise one starts its push now, so that it
        overlaps the step computing the KV."""
        target = self._targets.get(save.request_id)
        if target is None:
            return  # the Prefill call is gone (cancelled): nobody to send it for
        early = asyncio.create_task(self._push(target, save)) if self.layerwise else None
        self._saves[save.request_id] = (save, early)

    async def _push(self, target: asyncio.Future[TransferSpec], save: KVSave) -> tuple[int, float]:
        spec = await _wait_target(target)
        _check_fit(spec, save.layers)
        start = time.perf_counter()
        await self.sender.send(spec, save.layers, save.extras)
        seconds = time.perf_counter() - start
        num_bytes = _nbytes(save.layers)
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
