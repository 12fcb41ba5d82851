"""What synchronous and asynchronous stepping share: a step run to completion, around the KV
connector's hooks, and the post-processing of a step's tokens into outputs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from engine.kv_connector.base import KVConnector, KVConnectorMetadata, KVConnectorWorker
from engine.model_runner import ModelRunner
from engine.outputs import EngineCoreOutput
from engine.runner.handle import ModelRunnerOutput
from engine.sampling.logprobs import LogprobsTensors
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler
from engine.spec_decode.eagle import bound_states, save_states


class Stepper(ABC):
    """Runs `EngineCore.step`: schedule a batch, run it, turn its tokens into outputs.

    `kv_connector` is the core's (EngineCore.set_kv_connector): its worker side loads and saves
    KV around the forward pass of the steps whose metadata names work for it."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.kv_connector: KVConnector | None = None
        self.num_chained_steps = 0  # steps launched before the previous one's tokens were read
        self.num_deferred_steps = 0  # steps scheduled ahead that could not be launched

    @abstractmethod
    def step(self) -> list[EngineCoreOutput]:
        """Run one step (or read one launched earlier); what each request produced."""

    @abstractmethod
    def busy(self) -> bool:
        """True while a step is launched or scheduled whose outputs `step()` has yet to give."""

    @abstractmethod
    def wait(self) -> None:
        """Block until the device ran every launched step (its KV writes included)."""

    def run_to_completion(self, scheduled: SchedulerOutput) -> list[EngineCoreOutput]:
        """Run `scheduled`, wait for its tokens, and post-process them; the KV connector loads
        and saves what its metadata for the step says around the forward pass."""
        meta = scheduled.kv_connector_metadata
        worker = None if meta is None or self.kv_connector is None else self.kv_connector.worker
        try:
            layer_hook = None
            if worker is not None:
                assert meta is not None
                worker.start_load_kv(meta)
                layer_hook = self._layer_hook(worker, meta)
            result = self.runner.run(scheduled, layer_hook=layer_hook).result()
            if worker is not None:
                _save_hidden(worker, result)
                if result.states:  # EAGLE's: the prompt's states go with its KV
                    requests = {it.request.request_id: it.request for it in scheduled.scheduled}
                    save_states(worker, requests, result.states)
                worker.wait_for_save()  # before blocks of finished requests go back
            return self.post_process(scheduled, result)
        except BaseException:
            if worker is not None:
                worker.step_failed()
            raise

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

    def post_process(
        self, scheduled: SchedulerOutput, result: ModelRunnerOutput, advanced: bool = False
    ) -> list[EngineCoreOutput]:
        """Advance the requests of `scheduled` by the step's tokens (`advanced`: the scheduler
        already counted the step as computed, `Scheduler.schedule_next`) and attach logprobs."""
        _advance_prompt_logprobs(scheduled)
        outputs = self.scheduler.update_from_output(
            scheduled, result.sampled, advanced=advanced, accepted=result.accepted
        )
        if result.hidden:  # for the drafter (engine.spec_decode)
            for item in scheduled.scheduled:
                hidden = result.hidden.get(item.request.request_id)
                if hidden is not None:
                    item.request.spec_hidden = hidden
        for item in scheduled.scheduled if result.states else ():  # EAGLE's, until fed
            states = result.states.get(item.request.request_id)
            if states is not None:
                item.request.spec_states.append(states)
                bound_states(item.request.spec_states)
        return _with_logprobs(outputs, result)


def _save_hidden(worker: KVConnectorWorker, result: ModelRunnerOutput) -> None:
    """Speculative decoding across the hand-off: a request whose KV goes to another engine
    takes its last prompt position's hidden state along ("hidden_states"), so the drafter
    there (MLP speculator, EAGLE) speculates from its first decode step. Layer-wise pushes
    are announced before the forward pass: too late for it (the drafter starts a step later)."""
    for request_id, hidden in result.hidden.items():
        if worker.takes_extras(request_id):
            worker.save_extras(request_id, {"hidden_states": hidden.clone()})


def _advance_prompt_logprobs(scheduled: SchedulerOutput) -> None:
    for item in scheduled.scheduled:
        request = item.request
        if request.params.prompt_logprobs is not None:
            end = min(item.start + item.num_tokens, request.num_prompt_tokens - 1)
            request.prompt_logprob_pos = max(request.prompt_logprob_pos, end)


def _with_logprobs(
    outputs: list[EngineCoreOutput], result: ModelRunnerOutput
) -> list[EngineCoreOutput]:
    """`outputs` with the step's prompt logprobs and sample logprobs attached."""
    if not result.prompt_logprobs and not result.logprobs:
        return outputs
    by_id = {o.request_id: o for o in outputs}
    for request_id, rows in result.prompt_logprobs.items():
        out = by_id.get(request_id)
        if out is None:
            out = by_id[request_id] = EngineCoreOutput(request_id, [])
            outputs.append(out)
        out.prompt_logprobs = rows
    for request_id, rows in result.logprobs.items():
        out = by_id[request_id]
        n = len(out.new_token_ids)
        if n < len(rows.ranks):  # a stop among accepted drafts dropped the tokens after it
            rows = LogprobsTensors(rows.token_ids[:n], rows.logprobs[:n], rows.ranks[:n])
        out.new_logprobs = rows
    return outputs
