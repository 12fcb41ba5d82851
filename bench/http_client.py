"""OpenAI-compatible HTTP streaming client: Baton's router, vLLM, SGLang, or any such server.

Token-id and text prompts go to `POST {base}/completions`, chat messages to
`POST {base}/chat/completions`, with `stream: true` and `stream_options.include_usage` (and a
request's structured-outputs constraint as `bench.structured.http_fields` spells it). A server
-sent event with a choice counts as a piece of the answer when it carries text; an empty
completion choice counts too unless it is the end marker (it has a `finish_reason`), while an
empty chat delta (the opening role header, the closing marker) does not. An answer whose pieces
all decoded to nothing gets TTFT = end-to-end latency. Token counts come from the final `usage`
(prompt, completion, and `prompt_tokens_details.cached_tokens`); a server that sends no usage
gets the number of pieces as output tokens.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx

from bench.client import ClientOptions, StreamClock
from bench.records import RequestRecord
from bench.structured import http_fields
from bench.workload import BenchRequest, prompt_kind


def api_base(url: str) -> str:
    """`http://host:port` or `.../v1` -> `.../v1`, without a trailing slash."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


class OpenAIClient:
    """Streams completions from an OpenAI-compatible server at `url`.

    The API key comes from `api_key`, else $OPENAI_API_KEY, else none is sent.
    """

    name = "http"

    def __init__(self, url: str, options: ClientOptions, api_key: str | None = None) -> None:
        self.base = api_base(url)
        self.options = options
        key = api_key or os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(options.timeout_s), headers=headers, limits=limits
        )

    def body(self, request: BenchRequest) -> tuple[str, dict[str, Any]]:
        """The endpoint path and JSON body for `request`."""
        opts = self.options
        body: dict[str, Any] = {
            "max_tokens": request.max_tokens,
            "temperature": opts.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if opts.model:
            body["model"] = opts.model
        if opts.ignore_eos and request.structured_outputs is None:
            body["ignore_eos"] = True
        if request.structured_outputs is not None:
            body.update(http_fields(request.structured_outputs))
        body.update(opts.extra_body)
        if prompt_kind(request.prompt) == "messages":
            return "/chat/completions", {**body, "messages": request.prompt}
        return "/completions", {**body, "prompt": request.prompt}

    async def send(self, request: BenchRequest) -> RequestRecord:
        record = RequestRecord(index=request.index, session=request.session, turn=request.turn)
        path, body = self.body(request)
        clock = StreamClock()
        try:
            async with self._http.stream("POST", self.base + path, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    record.error = f"HTTP {response.status_code}: {text[:300]}"
                    return clock.finish(record)
                await self._read_events(response, clock, record)
        except (httpx.HTTPError, ValueError) as exc:
            record.error = f"{type(exc).__name__}: {exc}"[:300]
        clock.finish(record)
        record.success = not record.error
        if record.success and record.ttft_s is None:
            record.ttft_s = record.e2e_s
        if record.success and record.output_tokens == 0 and clock.last is not None:
            record.output_tokens = len(record.itl_s) + 1
        return record

    async def _read_events(
        self, response: httpx.Response, clock: StreamClock, record: RequestRecord
    ) -> None:
        pieces: list[str] = []
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                record.error = f"stream error: {json.dumps(event['error'])[:300]}"
                break
            for choice in event.get("choices") or []:
                if _is_piece(choice):
                    clock.piece()
                    pieces.append(_choice_text(choice))
            if event.get("usage"):
                _read_usage(event["usage"], record)
        record.text = "".join(pieces)

    async def aclose(self) -> None:
        await self._http.aclose()


def _is_piece(choice: dict[str, Any]) -> bool:
    """Whether a choice carries (part of) a token: text, or an empty completion piece that is
    not the end marker. A chat delta without content (the role header) is no piece."""
    if _choice_text(choice):
        return True
    return "delta" not in choice and choice.get("finish_reason") is None


def _choice_text(choice: dict[str, Any]) -> str:
    """The text of a completion choice or of a chat choice's delta."""
    if "delta" in choice:
        return (choice["delta"] or {}).get("content") or ""
    return choice.get("text") or ""


def _read_usage(usage: dict[str, Any], record: RequestRecord) -> None:
    record.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    record.output_tokens = int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    record.cached_tokens = int(details.get("cached_tokens") or 0)
