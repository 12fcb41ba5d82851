"""Replay of a user-supplied JSONL trace.

One JSON object per line (blank lines and lines starting with '#' are skipped):

    {"timestamp": 12.5, "prompt": "Explain ...", "max_tokens": 128}
    {"timestamp": 13.1, "prompt": [1543, 318, 257], "max_tokens": 64, "tenant": "acme"}
    {"timestamp": 14.0, "messages": [{"role": "user", "content": "Hi"}], "session_id": "s1"}

- `timestamp`: arrival time in seconds, any origin (optional; lines without one arrive with the
  previous line). Replay offsets are (timestamp - first timestamp) / speedup.
- exactly one of `prompt` (text, or a list of token ids) and `messages` (chat messages).
- `max_tokens`: output tokens (default: the workload's `default_max_tokens`).
- `session_id` (optional): lines with the same id are turns of one session, in file order; turn
  k is sent after turn k-1 finished, after the conversation so far (text or messages only).
- `tenant` (optional): sent as the gRPC `tenant`.

The trace's timestamps drive arrivals unless a rate is given (`--rate` replaces them). The first
`num_requests` lines are replayed (all of them when the trace is shorter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workload import BenchRequest, Prompt, prompt_kind


@dataclass(slots=True)
class TraceReplay:
    """Requests read from the JSONL file at `path`; seeds do not change them."""

    path: Path
    speedup: float = 1.0
    default_max_tokens: int = 128
    name: str = "trace"

    def generate(self, num_requests: int, seed: int, vocab_size: int | None) -> list[BenchRequest]:
        if self.speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {self.speedup}")
        rows = _read_rows(self.path, num_requests)
        requests: list[BenchRequest] = []
        sessions: dict[Any, tuple[int, int]] = {}  # session_id -> (session number, next turn)
        first_ts: float | None = None
        offset = 0.0
        for index, (line_no, row) in enumerate(rows):
            where = f"{self.path}:{line_no}"
            if "timestamp" in row:
                ts = float(row["timestamp"])
                first_ts = ts if first_ts is None else first_ts
                offset = (ts - first_ts) / self.speedup
            request = BenchRequest(
                index=index,
                prompt=_prompt(row, where),
                max_tokens=int(row.get("max_tokens", self.default_max_tokens)),
                arrival_s=offset,
                tenant=str(row.get("tenant", "")),
            )
            if "session_id" in row:
                _assign_turn(request, sessions, row["session_id"], where)
            requests.append(request)
        return requests

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "speedup": self.speedup,
                "default_max_tokens": self.default_max_tokens}


def _read_rows(path: Path, limit: int) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of the first `limit` records; ValueError naming a bad line."""
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if len(rows) >= limit:
                break
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            rows.append((line_no, row))
    if not rows:
        raise ValueError(f"{path}: the trace has no requests")
    return rows


def _prompt(row: dict[str, Any], where: str) -> Prompt:
    if ("prompt" in row) == ("messages" in row):
        raise ValueError(f"{where}: give exactly one of 'prompt' and 'messages'")
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [int(t) for t in prompt]
    raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of token ids")


def _assign_turn(
    request: BenchRequest, sessions: dict[Any, tuple[int, int]], session_id: Any, where: str
) -> None:
    if prompt_kind(request.prompt) == "token_ids":
        raise ValueError(f"{where}: a session's turns must be text or messages, not token ids")
    number, turn = sessions.get(session_id, (len(sessions), 0))
    sessions[session_id] = (number, turn + 1)
    request.session, request.turn = number, turn
