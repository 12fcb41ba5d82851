"""POST /v1/chat/completions: the chat template applied, n choices.

Streamed as vLLM does: first a chunk per choice with `{"role": "assistant", "content": ""}`,
then content deltas, the finish reason on a choice's last chunk, then (include_usage) a chunk
with no choices and the usage.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse

from router.completion import CompletionDelta
from router.generation import Generation
from router.openai.protocol import ChatCompletionRequest
from router.openai.responses import ChoiceState, chat_logprobs, usage_json
from router.openai.serving import open_stream, random_id, sse_response
from router.services import RouterServices


@dataclass(slots=True)
class ChatJob:
    """The generation of one chat request and what its responses need."""

    body: ChatCompletionRequest
    request_id: str
    created: int
    model: str
    generation: Generation

    @property
    def top_logprobs(self) -> int | None:
        """Top logprobs per token, None when logprobs were not asked for."""
        return (self.body.top_logprobs or 0) if self.body.logprobs else None

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A response body or chunk (`obj` is its "object") around `choices`."""
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def logprobs(self, token_ids: list[int], entries: list[Any]) -> dict[str, Any] | None:
        """The chat logprobs object for these tokens, None when not asked for."""
        top = self.top_logprobs
        return None if top is None else chat_logprobs(token_ids, entries, top)


async def create_chat_completion(body: ChatCompletionRequest, services: RouterServices) -> Response:
    """Validate, render the conversation, start its generation, answer (streamed or not)."""
    job = start_job(body, services)
    deltas = await open_stream(aiter(job.generation), body.constraint_field)
    if body.stream:
        return sse_response(_stream_events(job, deltas))
    return JSONResponse(await _collect(job, deltas))


def start_job(body: ChatCompletionRequest, services: RouterServices) -> ChatJob:
    """Apply the chat template, tokenize, validate and start the generation."""
    pre = services.preprocessor
    pre.check_model(body.model)
    params = body.to_sampling_params()
    text, token_ids = pre.render_chat(
        body.template_messages(),
        body.tools or None,
        add_generation_prompt=body.add_generation_prompt,
        chat_template_kwargs=body.chat_template_kwargs,
        add_special_tokens=body.add_special_tokens,
    )
    request_id = random_id("chatcmpl")
    request = pre.build(
        request_id,
        token_ids,
        params,
        text,
        body.priority,
        body.user or "",
        body.cache_salt,
        param="messages",
    )
    generation = services.generator.start(request)
    name = services.config.served_model_name
    return ChatJob(body, request_id, int(time.time()), name, generation)


async def _collect(job: ChatJob, deltas: AsyncIterator[CompletionDelta]) -> dict[str, Any]:
    choices = [ChoiceState() for _ in range(job.body.n)]
    async for delta in deltas:
        choices[delta.index].add(delta)
    body = job.envelope(
        "chat.completion",
        [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": job.logprobs(c.logprob_token_ids, c.logprobs),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for i, c in enumerate(choices)
        ],
    )
    body["usage"] = usage_json(job.generation.usage())
    return body


async def _stream_events(
    job: ChatJob, deltas: AsyncIterator[CompletionDelta]
) -> AsyncGenerator[dict[str, Any], None]:
    for i in range(job.body.n):
        role = {"role": "assistant", "content": ""}
        yield job.envelope(
            "chat.completion.chunk",
            [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}],
        )
    async for delta in deltas:
        logprobs = None
        if delta.logprobs:
            logprobs = job.logprobs(delta.token_ids[: len(delta.logprobs)], delta.logprobs)
        if not delta.text and logprobs is None and delta.finish_reason is None:
            continue  # nothing to show yet (text held back for a possible stop string)
        choice = {
            "index": delta.index,
            "delta": {"content": delta.text} if delta.text or not delta.finish_reason else {},
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }
        yield job.envelope("chat.completion.chunk", [choice])
    if job.body.include_usage:
        usage = usage_json(job.generation.usage())
        yield {**job.envelope("chat.completion.chunk", []), "usage": usage}
