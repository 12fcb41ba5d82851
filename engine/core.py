"""The engine core: schedule, run, update. Token ids in, token ids out; no text.

Both worker roles host one `EngineCore`; `LLMEngine` wraps it with tokenization and
detokenization for the offline API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from engine.config import EngineConfig
from engine.kv_cache.events import KVEvent, KVEventLog
from engine.kv_cache.manager import KVCacheManager, PrefixCacheStats, cdiv
from engine.kv_export import LayerwiseExport
from engine.model_runner import LaunchedStep, ModelRunner
from engine.outputs import EngineCoreOutput
from engine.request import Request, RequestStatus
from engine.sampling.topk_topp import advance_generator
from engine.sampling_params import SamplingType
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler


class EngineCore:
    """One model, one KV cache, one scheduler; `step()` runs one batch."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.events = KVEventLog(enabled=config.cache.enable_kv_events)
        self.kv = KVCacheManager(
            self.runner.num_blocks,
            config.cache.block_size,
            enable_caching=config.cache.enable_prefix_caching,
            model_identity=config.model.served_model_name,
            events=self.events,
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, config.model.max_model_len)
        self.scheduler.kv_export = self._export
        # Prefill role: KV of handed-off requests, by request id, for the host to send.
        self.exports: dict[str, list[torch.Tensor]] = {}
        # Prefill role, layer-wise export (engine.kv_export): when on, the step that computes a
        # request's last prompt chunk, for a request with a KVHandoff, fills a LayerwiseExport as
        # each layer finishes, announced to `on_kv_export(request_id, export)` (on the engine
        # thread) before the forward pass starts; `exports` then gets nothing for it. The export
        # completes even if the first token finishes the request (no handoff then): whoever
        # started sending it lets the transfer end (the decode side refuses or drops it).
        self.layerwise_export = False
        self.on_kv_export: Callable[[str, LayerwiseExport], None] | None = None
        self._step_exports: dict[str, LayerwiseExport] = {}
        # Asynchronous scheduling (see `step`): on with CUDA graphs unless the config says.
        self.async_scheduling = (
            config.async_scheduling
            if config.async_scheduling is not None
            else self.runner.graphs is not None
        )
        self._launched: tuple[SchedulerOutput, LaunchedStep] | None = None  # tokens unread
        self.num_chained_steps = 0  # steps launched before the previous one's tokens were read
        # A step scheduled ahead of a launched one's tokens that cannot be launched itself
        # (it samples otherwise than greedily, or asks for logprobs): the next `step()` runs it.
        self._deferred: SchedulerOutput | None = None
        self.num_deferred_steps = 0

    def add_request(self, request: Request) -> None:
        """Queue a validated request. Raises ValueError if it could never fit the KV cache."""
        self._check_fits(request)
        self.scheduler.add_request(request)

    def _check_fits(self, request: Request) -> None:
        longest = min(
            request.num_prompt_tokens + request.max_tokens, self.config.model.max_model_len
        )
        needed = cdiv(longest, self.config.cache.block_size)
        if needed > self.kv.pool.num_blocks:
            raise ValueError(
                f"prompt plus max_tokens ({longest} tokens) needs {needed} KV blocks, but the KV "
                f"cache holds {self.kv.pool.num_blocks}: lower max_tokens or raise the cache size"
            )

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Stop the given requests now and free their blocks; unknown ids are ignored."""
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Finish requests as stopped (a stop string matched in their text)."""
        return self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_work(self) -> bool:
        """True when `step()` would compute something (or read a launched step)."""
        return self._launched is not None or self._deferred is not None or self.scheduler.has_work()

    # --- disaggregation: the prefill and decode roles ------------------------------------

    def reserve(self, request: Request, reuse_prefix: bool = True) -> tuple[list[int], int]:
        """Decode role: hold KV blocks for `request`'s prompt (see Scheduler.reserve).

        Returns the block ids another engine must fill, and the prompt tokens cached here.
        """
        self._check_fits(request)
        if self._launched is not None and self._launched[1].ready is not None:
            # Blocks given out here are written by another stream (the KV receiver); a launched
            # step may still write the slots of blocks freed under it (a request it decodes
            # was aborted or stopped): let it finish first.
            self._launched[1].ready.synchronize()
        return self.scheduler.reserve(request, reuse_prefix)

    def start_decode(self, request_id: str, first_token: int) -> None:
        """Decode role: the reserved KV is in place; decode on from `first_token`."""
        request = self.scheduler.start_decode(request_id, first_token)
        seeded = request.params.sampling_type == SamplingType.RANDOM_SEED
        if seeded and request.generator is not None:  # the prefill engine drew the first token
            advance_generator(request.generator, self.config.model.vocab_size)

    def copy_blocks(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Prefill role: a copy of the given blocks' KV, one (2, n, block_size, Hkv, D) tensor
        per layer, taken before the blocks can be reused."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.config.device)
        return [cache.index_select(1, index) for cache in self.runner.kv_caches]

    def _export(self, request: Request, block_ids: list[int]) -> None:
        assert request.kv_transfer is not None
        if request.request_id in self._step_exports:
            return  # exported layer by layer during the step
        first = request.kv_transfer.num_cached_tokens // self.config.cache.block_size
        self.exports[request.request_id] = self.copy_blocks(block_ids[first:])

    def _start_exports(self, scheduled: SchedulerOutput) -> dict[str, LayerwiseExport]:
        """Layer-wise exports for the handed-off requests whose last prompt chunk runs now."""
        exports = {}
        for item in scheduled.scheduled:
            request, handoff = item.request, item.request.kv_transfer
            if handoff is None or item.start + item.num_tokens != request.num_prompt_tokens:
                continue
            first = handoff.num_cached_tokens // self.config.cache.block_size
            export = LayerwiseExport(self.runner.kv_caches, item.block_ids[first:])
            exports[request.request_id] = export
            if self.on_kv_export is not None:
                self.on_kv_export(request.request_id, export)
        return exports

    def write_blocks(self, block_ids: list[int], layers: list[torch.Tensor]) -> None:
        """Decode role: write KV (as `copy_blocks` returns it) into reserved blocks."""
        index = torch.tensor(block_ids, dtype=torch.long, device=self.config.device)
        for cache, data in zip(self.runner.kv_caches, layers, strict=True):
            cache.index_copy_(1, index, data.to(cache.device, cache.dtype))

    def drain_kv_events(self) -> list[KVEvent]:
        """KV events since the last drain (empty unless `enable_kv_events`)."""
        return self.events.drain()

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache; False (nothing done) while requests hold blocks."""
        return self.kv.reset_prefix_cache()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.kv.stats

    def step(self) -> list[EngineCoreOutput]:
        """Schedule a batch, run it, and return what each request produced.

        With asynchronous scheduling, a step whose sampling requests are all plainly greedy
        is launched without waiting for its tokens; the next `step()` schedules and launches
        the one after it (`Scheduler.schedule_next`), fed by those tokens on the device, and
        only then reads them. The GPU so runs step k+1 while the host turns step k's tokens
        into outputs and prepares step k+2. Outputs are those of the step read."""
        if self._launched is not None:
            return self._read_launched()
        scheduled, self._deferred = self._deferred, None
        if scheduled is not None:  # requests finished since it was scheduled drop out of it
            scheduled.scheduled = [
                it for it in scheduled.scheduled if it.request.status == RequestStatus.RUNNING
            ]
        if scheduled is None or scheduled.is_empty:
            scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        if self._may_launch(scheduled):
            self._launched = (scheduled, self.runner.launch(scheduled.scheduled))
            return self._read_launched()
        return self._execute(scheduled)

    def _may_launch(self, scheduled: SchedulerOutput) -> bool:
        """Asynchronous scheduling applies: every request is `Request.launchable`."""
        return self.async_scheduling and all(it.request.launchable for it in scheduled.scheduled)

    def _execute(self, scheduled: SchedulerOutput) -> list[EngineCoreOutput]:
        """Run `scheduled` and wait for its results."""
        exports = self._start_exports(scheduled) if self.layerwise_export else {}
        self._step_exports = exports
        try:
            result = self.runner.execute(scheduled, list(exports.values()))
            self._advance_prompt_logprobs(scheduled)
            outputs = self.scheduler.update_from_output(scheduled, result.sampled)
        except BaseException:
            for export in exports.values():
                export.cancel()
            raise
        finally:
            self._step_exports = {}
        by_id = {o.request_id: o for o in outputs}
        for request_id, rows in result.prompt_logprobs.items():
            out = by_id.get(request_id)
            if out is None:
                out = by_id[request_id] = EngineCoreOutput(request_id, [])
                outputs.append(out)
            out.prompt_logprobs = rows
        for request_id, rows in result.logprobs.items():
            by_id[request_id].new_logprobs = rows
        return outputs

    def _read_launched(self) -> list[EngineCoreOutput]:
        """Schedule the step after the launched one and launch it if it can be (else run it
        once the tokens are in), then read the launched one's tokens and advance its
        requests."""
        assert self._launched is not None
        scheduled, launched = self._launched
        self._launched = None
        after = self.scheduler.schedule_next(scheduled)
        advanced = after is not None  # `schedule_next` counted `scheduled` as computed
        if after is not None and after.is_empty:
            after = None
        if after is not None and self._may_launch(after):
            # A request that sampled in `launched` computes that (pending) token in `after`.
            picks = launched.picks_for(after.scheduled)
            self._launched = (after, self.runner.launch(after.scheduled, launched, picks))
            self.num_chained_steps += 1
        sampled = self.runner.finish(launched)
        outputs = self.scheduler.update_from_output(scheduled, sampled, advanced=advanced)
        if after is not None and self._launched is None:
            self._deferred = after  # scheduled ahead, not launchable: the next step runs it
            self.num_deferred_steps += 1
        return outputs

    def check_integrity(self, expect_all_free: bool = False) -> None:
        """The block pool's accounting check; with `expect_all_free`, also that nothing leaked."""
        self.kv.check_integrity(expect_all_free=expect_all_free)

    @staticmethod
    def _advance_prompt_logprobs(scheduled: SchedulerOutput) -> None:
        for item in scheduled.scheduled:
            request = item.request
            if request.params.prompt_logprobs is not None:
                end = min(item.start + item.num_tokens, request.num_prompt_tokens - 1)
                request.prompt_logprob_pos = max(request.prompt_logprob_pos, end)
