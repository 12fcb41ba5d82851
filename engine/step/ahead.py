"""Asynchronous scheduling: the device runs step k+1 while the host reads step k.

A step whose requests are all `Request.launchable` (greedy, nothing for the KV connector) is
launched without waiting for its tokens. The next `step()` schedules the one after it
(`Scheduler.schedule_next`), launches it fed by those tokens on the device, and only then
reads them. The GPU so runs step k+1 while the host turns step k's tokens into outputs and
prepares step k+2. Under structured outputs a request's token is the argmax under its grammar's
mask, which follows step k's token: step k+1's forward pass is launched first, and its masks
are filled once step k is read, then applied on the device (`LaunchedStep.finish`). A step
scheduled ahead that cannot be launched (it samples otherwise than greedily, or asks for
logprobs) is deferred: the next `step()` runs it to completion::

    step() 1:  schedule A, launch A | schedule B, launch B(A's tokens) | read A -> outputs
    step() 2:                         schedule C, launch C(B's tokens) | read B -> outputs
                                                                           | finish C (masks)
"""

from __future__ import annotations

from engine.model_runner import ModelRunner
from engine.outputs import EngineCoreOutput
from engine.runner.handle import LaunchedStep
from engine.scheduler.output import SchedulerOutput
from engine.scheduler.scheduler import Scheduler
from engine.step.base import Stepper


class AsyncStepper(Stepper):
    """Launch a step, launch the next fed by its tokens on the device, then read the first."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner) -> None:
        super().__init__(scheduler, runner)
        self._launched: tuple[SchedulerOutput, LaunchedStep] | None = None  # tokens unread
        self._deferred: SchedulerOutput | None = None  # scheduled ahead, not launchable

    def step(self) -> list[EngineCoreOutput]:
        """Outputs are those of the step read (launched by this call or the one before)."""
        if self._launched is None:
            scheduled = self._next_scheduled()
            if scheduled.is_empty:
                return []
            if not self.launchable(scheduled):
                return self.run_to_completion(scheduled)
            launched = self._launch(scheduled, None)
            launched.finish()  # every token it follows is known
            self._launched = (scheduled, launched)
        scheduled, launched = self._launched
        self._launched = None
        advanced = self._launch_next(scheduled, launched)
        outputs = self.post_process(scheduled, launched.result(), advanced=advanced)
        if self._launched is not None:  # its grammars' masks follow the tokens just read
            self._launched[1].finish()
        return outputs

    def busy(self) -> bool:
        return self._launched is not None or self._deferred is not None

    def wait(self) -> None:
        if self._launched is not None:
            self._launched[1].wait()

    @staticmethod
    def launchable(scheduled: SchedulerOutput) -> bool:
        """Every request is `Request.launchable` and verifies no drafts (speculative decoding
        reads its tokens: next), and the KV connector has nothing to do."""
        return scheduled.kv_connector_metadata is None and all(
            it.request.launchable and not it.draft_token_ids for it in scheduled.scheduled
        )

    def _next_scheduled(self) -> SchedulerOutput:
        """The deferred step (less requests finished since it was scheduled), else a new one."""
        scheduled, self._deferred = self._deferred, None
        if scheduled is not None:
            self.scheduler.prune(scheduled)
        if scheduled is None or scheduled.is_empty:
            scheduled = self.scheduler.schedule()
        return scheduled

    def _launch(self, scheduled: SchedulerOutput, previous: LaunchedStep | None) -> LaunchedStep:
        launched = self.runner.run(scheduled, ahead=True, previous=previous)
        assert isinstance(launched, LaunchedStep)
        return launched

    def _launch_next(self, scheduled: SchedulerOutput, launched: LaunchedStep) -> bool:
        """Schedule the step after `launched` and launch it if it can be (else defer it to the
        next `step()`). True when the scheduler counted `scheduled` as computed."""
        after = self.scheduler.schedule_next(scheduled)
        if after is None:
            return False
        if after.is_empty:
            return True
        if self.launchable(after):
            # A request that sampled in `launched` computes that (pending) token in `after`.
            self._launched = (after, self._launch(after, launched))
            self.num_chained_steps += 1
        else:
            self._deferred = after
            self.num_deferred_steps += 1
        return True
