"""What one request measured: the per-request record every aggregate is computed from.

Times are seconds. TTFT runs from just before the request is sent to the first streamed piece of
the answer; inter-token latencies (ITL) are the gaps between later pieces (a piece may carry more
than one token); TPOT is DistServe's and vLLM's time per output token after the first:

    TPOT = (e2e - TTFT) / (output_tokens - 1)         (None for a one-token answer)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    """One request's timings (seconds) and token counts.

    `start_s`: when it was sent, seconds after the run started. `cached_tokens`: prompt tokens
    the server reports as served from its prefix cache. `text` (the answer) is kept for the next
    turn of a session and left out of the JSON. `structured`: the request carried a
    structured-outputs constraint; `structured_valid`: its answer kept it (None: not checked).
    """

    index: int
    success: bool = False
    error: str = ""
    session: int | None = None
    turn: int = 0
    start_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    text: str = ""
    structured: bool = False
    structured_valid: bool | None = None

    @property
    def tpot_s(self) -> float | None:
        """Mean seconds per output token after the first; None below two tokens."""
        if not self.success or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        """Every measured field plus `tpot_s`, without the answer text."""
        return {
            "index": self.index,
            "success": self.success,
            "error": self.error,
            "session": self.session,
            "turn": self.turn,
            "start_s": self.start_s,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "e2e_s": self.e2e_s,
            "itl_s": self.itl_s,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
            "structured": self.structured,
            "structured_valid": self.structured_valid,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RequestRecord:
        """The inverse of `to_json` (the answer text is lost)."""
        fields = {k: v for k, v in data.items() if k != "tpot_s"}
        return cls(**fields)
