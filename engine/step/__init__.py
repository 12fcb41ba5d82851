"""Engine stepping, chosen once from `config.async_scheduling` (see EngineCore).

    base.py    Stepper: what both share (a step run to completion around the KV connector's
               hooks; post-processing into outputs)
    sync.py    SyncStepper: schedule, run to completion, post-process
    ahead.py   AsyncStepper: launch a step, schedule and launch the next, then read the first
"""

from engine.step.ahead import AsyncStepper
from engine.step.base import Stepper
from engine.step.sync import SyncStepper

__all__ = ["AsyncStepper", "Stepper", "SyncStepper"]
