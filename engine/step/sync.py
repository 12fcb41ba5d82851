"""Synchronous stepping: every step runs to completion before the next is scheduled."""

from __future__ import annotations

from engine.outputs import EngineCoreOutput
from engine.step.base import Stepper


class SyncStepper(Stepper):
    """Schedule a batch, run it to completion, post-process its tokens."""

    def step(self) -> list[EngineCoreOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        return self.run_to_completion(scheduled)

    def busy(self) -> bool:
        return False  # each step's outputs are given by the call that ran it

    def wait(self) -> None:
        return None  # nothing is ever left running on the device
