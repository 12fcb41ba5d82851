"""OpenAI's response shapes: usage, logprobs (completions and chat), SSE framing, and the
per-choice accumulator of non-streamed responses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from common.logprobs import Logprob, TokenLogprobDict
from router.completion import CompletionDelta
from router.generation import Usage

MIN_LOGPROB = -9999.0  # what OpenAI sends instead of -inf (JSON has no infinities)

DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's `usage`, with cached prompt tokens under `prompt_tokens_details`."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def sum_usage(usages: list[Usage]) -> Usage:
    """Usage of several prompts served as one request."""
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
    )


def _logprob(entry: Logprob) -> float:
    return max(entry.logprob, MIN_LOGPROB)


def completion_logprobs(
    token_ids: list[int], entries: list[TokenLogprobDict], num: int, text_offset: int
) -> dict[str, Any]:
    """The legacy completions `logprobs` object for some tokens (vLLM's layout): each token's
    text and logprob, the sampled and `num` top tokens, and character offsets starting at
    `text_offset`."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    offsets: list[int] = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        own = entry[token_id]
        text = own.decoded_token or ""
        tokens.append(text)
        token_logprobs.append(_logprob(own))
        top = list(entry.values())[: num + 1]
        top_logprobs.append({(e.decoded_token or ""): _logprob(e) for e in top})
        offsets.append(text_offset)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def chat_logprobs(
    token_ids: list[int], entries: list[TokenLogprobDict], top_n: int
) -> dict[str, Any]:
    """The chat `logprobs` object: per token its text, logprob, UTF-8 bytes and the `top_n`
    most likely tokens."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        ranked = sorted((e for e in entry.values() if (e.rank or 0) <= top_n), key=_rank)
        top = [_chat_entry(e) for e in ranked[:top_n]]
        content.append({**_chat_entry(entry[token_id]), "top_logprobs": top})
    return {"content": content}


def _rank(entry: Logprob) -> int:
    return entry.rank or 0


def _chat_entry(entry: Logprob) -> dict[str, Any]:
    text = entry.decoded_token or ""
    return {
        "token": text,
        "logprob": _logprob(entry),
        "bytes": list(text.encode("utf-8", errors="replace")),
    }


@dataclass(slots=True)
class ChoiceState:
    """Everything one choice has produced (for a non-streamed response)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprob_token_ids: list[int] = field(default_factory=list)  # the tokens `logprobs` cover
    logprobs: list[TokenLogprobDict] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, delta: CompletionDelta) -> None:
        """Append one delta of this choice."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprob_token_ids.extend(delta.token_ids[: len(delta.logprobs)])
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
