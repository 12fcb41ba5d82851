"""The engine core: schedule, run, update. Token ids in, token ids out; no text.

Both worker roles host one `EngineCore`; `LLMEngine` wraps it with tokenization and
detokenization for the offline API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from engine.config import EngineConfig
from engine.kv_cache.events import KVEvent, KVEventLog
from engine.kv_cache.manager import KVCacheManager, PrefixCacheStats, cdiv
from engine.kv_connector.base import KVConnector, KVConnectorMetadata, KVConnectorWorker
from engine.model_runner import LaunchedStep, ModelRunner, ModelRunnerOutput
from engine.outputs import EngineCoreOutput
from engine.request import Request, RequestStatus
from engine.sampling.topk_topp import advance_generator
from engine.sampling_params import SamplingType
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler


class EngineCore:
    """One model, one KV cache, one scheduler; `step()` runs one batch.

    With a KV connector (engine.kv_connector), some requests' KV comes from another engine or
    goes to one; the core only calls the connector's hooks and knows no role."""

    def __init__(self, config: EngineConfig, kv_connector: KVConnector | None = None) -> None:
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
        self.kv_connector: KVConnector | None = None
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
        if kv_connector is not None:
            self.set_kv_connector(kv_connector)

    def set_kv_connector(self, connector: KVConnector | None) -> None:
        """Install `connector` (None: remove it); it registers the KV caches. Only while the
        engine holds no request and no step is under way (ValueError otherwise)."""
        busy = self._launched is not None or self._deferred is not None
        if busy or self.scheduler.holds_blocks():
            raise ValueError("a KV connector is installed only while the engine is empty")
        if connector is not None:
            connector.worker.register_kv_caches(self.runner.kv_caches)
        self.kv_connector = connector
        self.scheduler.connector = None if connector is None else connector.scheduler

    def add_request(self, request: Request) -> None:
        """Queue a validated request. Raises ValueError if it could never fit the KV cache.

        A request whose KV the connector says comes from elsewhere gets its blocks now and
        waits for it (EngineOverloadedError if the blocks are not free)."""
        self._check_fits(request)
        self._update_from_connector()  # blocks of arrived KV are in the prefix cache for it
        self.scheduler.add_request(request)
        if request.status == RequestStatus.WAITING_FOR_KV:
            self._wait_for_launched()

    def _wait_for_launched(self) -> None:
        # Blocks just given out are written by another stream (a KV receiver's); a launched
        # step may still write the slots of blocks freed under it (a request it decodes was
        # aborted or stopped): let it finish first.
        if self._launched is not None and self._launched[1].ready is not None:
            self._launched[1].ready.synchronize()

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
        """True when `step()` would compute something (or read a launched step). Applies the
        KV connector's finished transfers first, so a request whose KV arrived counts."""
        self._update_from_connector()
        return self._launched is not None or self._deferred is not None or self.scheduler.has_work()

    def _update_from_connector(self) -> None:
        """Hand the connector's finished transfers to the scheduler. A request resumed after
        KV from elsewhere has only output tokens sampled elsewhere (the prefill engine's): a
        seeded generator skips the draws they took."""
        if self.kv_connector is None:
            return
        finished = self.kv_connector.worker.get_finished()
        if not finished:
            return
        vocab_size = self.config.model.vocab_size
        for request in self.scheduler.update_from_connector(finished):
            generator = request.generator
            if request.params.sampling_type == SamplingType.RANDOM_SEED and generator is not None:
                for _ in range(request.num_output_tokens):
                    advance_generator(generator, vocab_size)

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
        self._update_from_connector()
        if self._launched is not None:
            return self._read_launched()
        scheduled, self._deferred = self._deferred, None
        if scheduled is not None:  # requests finished since it was scheduled drop out of it
            self.scheduler.prune(scheduled)
        if scheduled is None or scheduled.is_empty:
            scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        if self._may_launch(scheduled):
            self._launched = (scheduled, self.runner.launch(scheduled.scheduled))
            return self._read_launched()
        return self._execute(scheduled)

    def _may_launch(self, scheduled: SchedulerOutput) -> bool:
        """Asynchronous scheduling applies: every request is `Request.launchable`, and the KV
        connector has nothing to do in the step."""
        return (
            self.async_scheduling
            and scheduled.kv_connector_metadata is None
            and all(it.request.launchable for it in scheduled.scheduled)
        )

    def _execute(self, scheduled: SchedulerOutput) -> list[EngineCoreOutput]:
        """Run `scheduled` and wait for its results; the KV connector loads and saves what its
        metadata for the step says around the forward pass."""
        meta = scheduled.kv_connector_metadata
        worker = None if meta is None or self.kv_connector is None else self.kv_connector.worker
        try:
            layer_hook = None
            if worker is not None:
                assert meta is not None
                worker.start_load_kv(meta)
                layer_hook = self._layer_hook(worker, meta)
            result = self.runner.execute(scheduled, layer_hook)
            if worker is not None:
                worker.wait_for_save()
            self._advance_prompt_logprobs(scheduled)
            outputs = self.scheduler.update_from_output(scheduled, result.sampled)
        except BaseException:
            if worker is not None:
                worker.step_failed()
            raise
        return self._with_logprobs(outputs, result)

    def _layer_hook(
        self, worker: KVConnectorWorker, meta: KVConnectorMetadata
    ) -> Callable[[int], None] | None:
        """For a per-layer step: wait for layer 0's load now, and return what runs after each
        layer i (save it, wait for layer i + 1's load). None for other steps."""
        if not meta.per_layer:
            return None
        kv_caches = self.runner.kv_caches
        worker.wait_for_layer_load(0)

        def after_layer(i: int) -> None:
            worker.save_kv_layer(i, kv_caches[i])
            if i + 1 < len(kv_caches):
                worker.wait_for_layer_load(i + 1)

        return after_layer

    @staticmethod
    def _with_logprobs(
        outputs: list[EngineCoreOutput], result: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """`outputs` with the step's prompt logprobs and sample logprobs attached."""
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
