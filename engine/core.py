"""The engine core: schedule, run, update. Token ids in, token ids out; no text.

Both worker roles host one `EngineCore`; `LLMEngine` wraps it with tokenization and
detokenization for the offline API.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable

from engine.config import EngineConfig
from engine.kv_cache.events import KVEvent, KVEventLog
from engine.kv_cache.manager import KVCacheManager, PrefixCacheStats, cdiv
from engine.kv_connector.base import KVConnector
from engine.model_runner import ModelRunner
from engine.outputs import EngineCoreOutput
from engine.request import Request, RequestStatus
from engine.sampling.topk_topp import advance_generator
from engine.sampling_params import SamplingType
from engine.scheduler.scheduler import Scheduler
from engine.spec_decode import DrafterContext, Proposer, SpecDecodeLogger, build_proposer
from engine.spec_decode.eagle import states_from_extras
from engine.step import AsyncStepper, Stepper, SyncStepper
from engine.structured.manager import StructuredOutputManager

# With nothing else to run, how long a step waits for a grammar compile (seconds).
GRAMMAR_WAIT_S = 0.05


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
        self.structured = StructuredOutputManager(config.structured_outputs, config.model)
        spec = config.speculative
        self.proposer: Proposer | None = None
        if spec is not None:
            drafting_for = DrafterContext(
                config.model, self.runner.device, config.model.dtype,
                num_blocks=self.runner.num_blocks, block_size=config.cache.block_size,
                target_model=self.runner.model, cuda_graphs=self.runner.graphs is not None,
                max_num_seqs=config.scheduler.max_num_seqs,
            )  # fmt: skip
            self.proposer = build_proposer(spec, drafting_for)
            if self.proposer.state_layers is not None:  # EAGLE: every position's states
                self.runner.keep_states(self.proposer.state_layers)
        if self.proposer is not None:
            self.scheduler.finish_listeners.append(self.proposer.finished)  # drafter state
        self.spec_logger = SpecDecodeLogger(self.scheduler.spec_stats)
        self.kv_connector: KVConnector | None = None
        # Asynchronous scheduling (engine.step.ahead): on with CUDA graphs unless the config says.
        on = config.async_scheduling
        self.stepper: Stepper = SyncStepper(self.scheduler, self.runner)
        # Not with speculative decoding: a launched step's tokens are unknown when drafting,
        # so its requests could not draft (verify steps run to completion). Next.
        default = self.runner.graphs is not None and config.speculative is None
        self.set_async_scheduling(default if on is None else on)
        if kv_connector is not None:
            self.set_kv_connector(kv_connector)

    @property
    def async_scheduling(self) -> bool:
        """Whether steps are launched before the previous one's tokens are read."""
        return isinstance(self.stepper, AsyncStepper)

    def set_async_scheduling(self, on: bool) -> None:
        """Step asynchronously (`on`) or synchronously from the next step on, e.g. to measure
        what the overlap gains on one engine. Only between steps (ValueError while a step is
        launched or scheduled ahead); the step counters carry over."""
        if self.stepper.busy():
            raise ValueError("async scheduling is switched only between steps")
        old = self.stepper
        self.stepper = (AsyncStepper if on else SyncStepper)(self.scheduler, self.runner)
        self.stepper.kv_connector = old.kv_connector
        self.stepper.num_chained_steps = old.num_chained_steps
        self.stepper.num_deferred_steps = old.num_deferred_steps

    def set_kv_connector(self, connector: KVConnector | None) -> None:
        """Install `connector` (None: remove it); it registers the KV caches. Only while the
        engine holds no request and no step is under way (ValueError otherwise)."""
        if self.stepper.busy() or self.scheduler.holds_blocks():
            raise ValueError("a KV connector is installed only while the engine is empty")
        if connector is not None:
            connector.worker.register_kv_caches(self.runner.kv_caches)
        self.kv_connector = self.stepper.kv_connector = connector
        self.scheduler.connector = None if connector is None else connector.scheduler

    def add_request(self, request: Request) -> None:
        """Queue a validated request. Raises ValueError if it could never fit the KV cache.

        A request whose KV the connector says comes from elsewhere gets its blocks now and
        waits for it (EngineOverloadedError if the blocks are not free)."""
        self._check_fits(request)
        self.structured.attach(request)  # its grammar compiles off the step
        self._update_from_connector()  # blocks of arrived KV are in the prefix cache for it
        self.scheduler.add_request(request)
        if request.status == RequestStatus.WAITING_FOR_KV:
            # Blocks just given out are written by another stream (a KV receiver's); a launched
            # step may still write the slots of blocks freed under it (a request it decodes was
            # aborted or stopped): let it finish first.
            self.stepper.wait()

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
        scheduler = self.scheduler
        return self.stepper.busy() or scheduler.has_work() or bool(scheduler.waiting_for_grammar)

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
        worker = self.kv_connector.worker
        arrived = self.scheduler.update_from_connector(finished)
        for request in arrived:
            hidden = worker.get_extras(request.request_id).get("hidden_states")
            if hidden is not None and self.runner.keep_hidden:  # the drafter's first state
                request.spec_hidden = hidden.to(self.runner.device, self.config.model.dtype)
            states = states_from_extras(worker.get_extras(request.request_id))
            if states is not None and self.runner.eager.state_layers is not None:  # EAGLE's
                rows = states[1].to(self.runner.device, self.config.model.dtype)
                request.spec_states = [(states[0], rows)]
            generator = request.generator
            if request.params.sampling_type == SamplingType.RANDOM_SEED and generator is not None:
                for _ in range(request.num_output_tokens):
                    advance_generator(generator, vocab_size)
        if self.proposer is not None:  # their first decode step verifies drafts
            queued = [r for r in arrived if r.status == RequestStatus.WAITING]
            self._draft_for(self.proposer, queued)

    def drain_kv_events(self) -> list[KVEvent]:
        """KV events since the last drain (empty unless `enable_kv_events`)."""
        return self.events.drain()

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache; False (nothing done) while requests hold blocks."""
        return self.kv.reset_prefix_cache()

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.kv.stats

    @property
    def num_chained_steps(self) -> int:
        """Steps launched before the previous one's tokens were read."""
        return self.stepper.num_chained_steps

    @property
    def num_deferred_steps(self) -> int:
        """Steps scheduled ahead of a launched one's tokens that could not be launched."""
        return self.stepper.num_deferred_steps

    def step(self) -> list[EngineCoreOutput]:
        """Schedule a batch, run it, and return what each request produced: synchronously
        (engine.step.sync), or with asynchronous scheduling (engine.step.ahead), where the
        outputs are those of the step launched one call earlier."""
        self._update_from_connector()
        failed = self._update_from_grammars()
        outputs = self.stepper.step() + failed
        if self.proposer is not None:
            self._propose(self.proposer)
            self.spec_logger.maybe_log()
        return outputs

    def _propose(self, proposer: Proposer) -> None:
        """Draft for each running request that decodes next (speculative decoding); none
        while `disable_by_batch_size` requests or more run."""
        spec = self.config.speculative
        assert spec is not None
        running = self.scheduler.running
        for request in running:
            request.spec_token_ids = []
        limit = spec.disable_by_batch_size
        if limit is not None and len(running) >= limit:
            return
        self._draft_for(proposer, running)

    def _draft_for(self, proposer: Proposer, requests: Iterable[Request]) -> None:
        """Set the drafts of each of `requests` that decodes one known token next."""
        spec = self.config.speculative
        assert spec is not None
        decoding = [
            r for r in requests
            if r.speculates and r.num_computed_tokens == len(r.all_token_ids) - 1
        ]  # fmt: skip
        if not decoding:
            return
        k = spec.num_speculative_tokens
        room = [min(k, r.max_tokens - len(r.output_token_ids) - 1) for r in decoding]
        for request, drafts in zip(decoding, proposer.propose(decoding, room), strict=True):
            if drafts and request.grammar is not None:
                drafts = request.grammar.valid_drafts(request.output_token_ids, drafts)
            request.spec_token_ids = drafts

    def _update_from_grammars(self) -> list[EngineCoreOutput]:
        """Queue the requests whose grammar compiled; an output (aborted, with the error) for
        each whose compile failed. With nothing else to run, wait a moment for a compile."""
        scheduler = self.scheduler
        compiling = scheduler.waiting_for_grammar
        if not compiling:
            return []
        if not (self.stepper.busy() or scheduler.has_work()):
            futures = [r.grammar.future for r in compiling.values() if r.grammar is not None]
            concurrent.futures.wait(
                futures, timeout=GRAMMAR_WAIT_S, return_when=concurrent.futures.FIRST_COMPLETED
            )
        return [
            EngineCoreOutput(request.request_id, [], finish_reason="abort", error=str(error))
            for request, error in scheduler.update_from_grammars()
        ]

    def check_integrity(self, expect_all_free: bool = False) -> None:
        """The block pool's accounting check; with `expect_all_free`, also that nothing leaked."""
        self.kv.check_integrity(expect_all_free=expect_all_free)
