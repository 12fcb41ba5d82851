"""The decode time of one batch in the offline engine, in wall-clock and in process CPU seconds.

The window runs from the last request's first token to the last token (the engine stamps both in
each request's `RequestMetrics`, with `time.time()`): every step in it is a decode step of the
whole batch, whatever the prompts cost. Its CPU time comes from `CpuSampler`, a thread that reads
the process's CPU clock every few milliseconds while the batch runs, interpolated at the window's
ends. On a CPU shared with other work, CPU seconds move much less with the others' load than wall
seconds do (the demo model's 32-prompt prefill on the 2-core machine at load 8: wall 22 to 35 s,
CPU 9.7 to 13.6 s); on a GPU only wall time means anything.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from typing import Any


class CpuSampler:
    """Samples (wall seconds, process CPU seconds) every `period_s` on a thread, while entered;
    `cpu_at(wall)` reads the process CPU clock at a past wall time (`time.time()`)."""

    def __init__(self, period_s: float = 0.005) -> None:
        self.period_s = period_s
        self._walls: list[float] = []
        self._cpus: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        self._walls.append(time.time())
        self._cpus.append(time.process_time())

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def cpu_at(self, wall: float) -> float:
        """Process CPU seconds at `wall`, interpolated between the samples around it."""
        i = min(max(bisect.bisect_left(self._walls, wall), 1), len(self._walls) - 1)
        w0, w1, c0, c1 = self._walls[i - 1], self._walls[i], self._cpus[i - 1], self._cpus[i]
        return c0 if w1 == w0 else c0 + (c1 - c0) * (wall - w0) / (w1 - w0)


def decode_run(llm: Any, prompts: list[list[int]], params: Any) -> dict[str, Any]:
    """One `generate` of all `prompts`: the decode window's wall and CPU seconds and the tokens
    generated in it (each request's first token came before), per token in ms; the engine
    core's steps launched ahead (`chained_steps`) and deferred in the run; how many answers
    parse as JSON, and the first answer's start."""
    core = llm.engine.core
    chained, deferred = core.num_chained_steps, core.num_deferred_steps
    with CpuSampler() as sampler:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    firsts = [o.metrics.first_token_time for o in outputs]
    start, end = max(firsts), max(o.metrics.last_token_time for o in outputs)
    cpu = sampler.cpu_at(end) - sampler.cpu_at(start)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    decode_tokens = tokens - len(outputs)
    texts = [o.outputs[0].text for o in outputs]
    return {
        "decode_seconds": end - start,
        "decode_cpu_seconds": cpu,
        "output_tokens": tokens,
        "decode_tokens": decode_tokens,
        "ms_per_token": 1000 * (end - start) / decode_tokens,
        "cpu_ms_per_token": 1000 * cpu / decode_tokens,
        "first_token_spread_ms": 1000 * (max(firsts) - min(firsts)),
        "chained_steps": core.num_chained_steps - chained,
        "deferred_steps": core.num_deferred_steps - deferred,
        "finished_json": sum(_parses(t) for t in texts),
        "sample_text": texts[0][:160],
    }


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
