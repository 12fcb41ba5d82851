"""What `ModelRunner.run` returns: a handle on one step, whose tokens come when asked.

A step either ran to completion (`CompletedStep`: its tokens are on the host already) or was
launched ahead (`LaunchedStep`, asynchronous scheduling: queued on the device, its argmax read
on `result()`, and meanwhile able to feed the next launched step's input tokens on the device).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.sampling.logprobs import LogprobsTensors
from engine.scheduler.output import ScheduledRequest


@dataclass(slots=True)
class ModelRunnerOutput:
    """Per request id: the sampled token, its logprobs row, and prompt logprobs rows; for a
    request that verified drafts, the drafts accepted (they come before its sampled token)."""

    sampled: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, list[int]] = field(default_factory=dict)
    # drafters that read the model's states: the final hidden state (H,) behind each request's
    # last token (`ModelRunner.keep_hidden`)
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    # EAGLE: (first position, (m, D) states) of the rows whose next token is known: a chunk's
    # rows, a verifying request's up to its last accepted draft (`EagerForward.state_layers`)
    states: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    logprobs: dict[str, LogprobsTensors] = field(default_factory=dict)
    prompt_logprobs: dict[str, LogprobsTensors] = field(default_factory=dict)


class StepHandle(ABC):
    """A step the runner started. `result()` is called once: it may wait for the device."""

    __slots__ = ()

    @property
    @abstractmethod
    def ahead(self) -> bool:
        """True when the step was launched ahead: its tokens are not on the host yet."""

    @abstractmethod
    def result(self) -> ModelRunnerOutput:
        """The step's sampled tokens (and logprobs), by request id."""


@dataclass(slots=True)
class CompletedStep(StepHandle):
    """A step run to completion: sampled, its tokens read."""

    output: ModelRunnerOutput

    @property
    def ahead(self) -> bool:
        return False

    def result(self) -> ModelRunnerOutput:
        return self.output


# Where a launched step's ids go for the host to read: (host tensor, event once there).
CopyOut = Callable[[torch.Tensor], tuple[torch.Tensor, "torch.cuda.Event | None"]]


@dataclass(slots=True)
class LaunchedStep(StepHandle):
    """A greedy step queued on the device whose sampled tokens are not read yet.

    `tokens` holds the step's argmax ids on the device: `samplers[j]` (the items that sample,
    in the step's order) has its token at row `rows[j]`, which the next step reads on the
    device if it chains on (`picks_for`). Once `finish`ed, `host_tokens` are the same ids in
    (pinned) host memory, readable once `ready` completes (None on the CPU: the step ran
    synchronously). `in_graph`: the step ran in a decode graph, so its ids are the graphs'
    `last_greedy`.

    `grammars`, when some sampler has structured outputs, rewrites those rows of `tokens` with
    the argmax under each grammar's mask. The mask needs the request's tokens up to the
    previous step, so a step launched before those were read is finished later
    (`AsyncStepper`): its forward pass runs on the device meanwhile, and the masks are filled
    on the host in its shadow. Other steps are finished at launch."""

    samplers: list[ScheduledRequest]
    rows: list[int]
    tokens: torch.Tensor
    copy_out: CopyOut
    grammars: Callable[[], None] | None = None
    in_graph: bool = False
    host_tokens: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None
    finished: bool = False

    @property
    def ahead(self) -> bool:
        return True

    def finish(self) -> None:
        """Apply the grammars' masks (if any), then queue the ids' copy to the host; once."""
        if self.finished:
            return
        device = self.tokens.device  # the engine may step on another thread: work on its GPU
        with (
            torch.inference_mode(),
            torch.cuda.device(device) if device.type == "cuda" else (contextlib.nullcontext()),
        ):
            if self.grammars is not None:
                self.grammars()
            self.host_tokens, self.ready = self.copy_out(self.tokens)
        self.finished = True

    def wait(self) -> None:
        """Block until the step ran on the device (its KV writes included)."""
        if self.ready is not None:
            self.ready.synchronize()

    def result(self) -> ModelRunnerOutput:
        """The sampled token ids by request id (waits for this step only)."""
        assert self.finished and self.host_tokens is not None, "finish() comes first"
        self.wait()
        tokens: list[int] = self.host_tokens.tolist()
        sampled = {
            it.request.request_id: tokens[r] for it, r in zip(self.samplers, self.rows, strict=True)
        }
        return ModelRunnerOutput(sampled=sampled)

    def row_of(self) -> dict[str, int]:
        """The row of `tokens` of each sampled request, by request id."""
        return {it.request.request_id: r for it, r in zip(self.samplers, self.rows, strict=True)}

    def picks_for(self, items: list[ScheduledRequest]) -> list[int | None]:
        """For each of a next step's items, the row of `tokens` that holds its input token
        (it sampled here), else None."""
        samplers = self.samplers
        if len(items) == len(samplers) and all(
            a.request is b.request for a, b in zip(items, samplers, strict=True)
        ):  # the same requests in the same order: a decode step after a decode step
            return list(self.rows)
        row_of = self.row_of()
        return [row_of.get(it.request.request_id) for it in items]
