"""POST /v1/chat/completions: the chat template applied, n choices.

Streamed as vLLM does: first a chunk per choice with `{"role": "assistant", "content": ""}`,
then content deltas, the finish reason on a choice's last chunk, then (include_usage) a chunk
with no choices and the usage.

With tools or a reasoning parser (common.tools), each choice's answer is read by its own
`AnswerParser`: `reasoning_content`, content and `tool_calls` deltas (a call's first delta with
its index, id, type and name, then argument fragments), and the message of a non-streamed
answer is the same parse of the whole text. A choice that called tools and stopped finishes
with `tool_calls`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse

from common.tools.answers import AnswerReading
from common.tools.errors import ToolRequestError
from common.tools.request import ToolPlan, plan_tools
from common.tools.stream import AnswerParser, Delta
from router.completion import CompletionDelta
from router.errors import InvalidRequestError
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
    reading: AnswerReading

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
    settings = services.config.tools
    plan = _plan(body, services)
    params = body.to_sampling_params(plan.constraint)
    text, token_ids = pre.render_chat(
        body.template_messages(),
        plan.template_tools,
        add_generation_prompt=body.add_generation_prompt,
        chat_template_kwargs=body.chat_template_kwargs,
        add_special_tokens=body.add_special_tokens,
    )
    reading = AnswerReading.of(
        plan, settings, text, body.chat_template_kwargs, body.include_reasoning
    )
    params = reading.adjust(params, pre.tokenizer)
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
    return ChatJob(body, request_id, int(time.time()), name, generation, reading)


def _plan(body: ChatCompletionRequest, services: RouterServices) -> ToolPlan:
    """The request's tool plan; a bad tools request is a 400 naming its field."""
    try:
        return plan_tools(
            body.tools, body.tool_choice, body.parallel_tool_calls, services.config.tools
        )
    except ToolRequestError as error:
        raise InvalidRequestError(error.message, error.param, error.code) from error


async def _collect(job: ChatJob, deltas: AsyncIterator[CompletionDelta]) -> dict[str, Any]:
    choices = [ChoiceState() for _ in range(job.body.n)]
    async for delta in deltas:
        choices[delta.index].add(delta)
    body = job.envelope("chat.completion", [_choice(job, i, c) for i, c in enumerate(choices)])
    body["usage"] = usage_json(job.generation.usage())
    return body


def _choice(job: ChatJob, index: int, choice: ChoiceState) -> dict[str, Any]:
    """One choice of a non-streamed response, its answer parsed when tools or reasoning ask."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    finish_reason = choice.finish_reason
    parser = job.reading.parser()
    if parser is not None:
        parser.feed(choice.text)
        parsed = parser.result()
        message["content"] = parsed.content
        if parsed.reasoning is not None and job.reading.include_reasoning:
            message["reasoning_content"] = parsed.reasoning
        if job.reading.plan.parser is not None:
            message["tool_calls"] = parsed.tool_calls
        finish_reason = _finish_reason(finish_reason, bool(parsed.tool_calls))
    return {
        "index": index,
        "message": message,
        "logprobs": job.logprobs(choice.logprob_token_ids, choice.logprobs),
        "finish_reason": finish_reason,
        "stop_reason": choice.stop_reason,
    }


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's `tool_calls` for an answer that called tools and stopped on its own."""
    return "tool_calls" if called and reason == "stop" else reason


async def _stream_events(
    job: ChatJob, deltas: AsyncIterator[CompletionDelta]
) -> AsyncGenerator[dict[str, Any], None]:
    for i in range(job.body.n):
        role = {"role": "assistant", "content": ""}
        yield job.envelope(
            "chat.completion.chunk",
            [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}],
        )
    parsers = [job.reading.parser() for _ in range(job.body.n)]
    called = [False] * job.body.n
    async for delta in deltas:
        logprobs = None
        if delta.logprobs:
            logprobs = job.logprobs(delta.token_ids[: len(delta.logprobs)], delta.logprobs)
        parser = parsers[delta.index]
        if parser is None:
            content = {"content": delta.text} if delta.text or not delta.finish_reason else {}
            reason = delta.finish_reason
        else:
            content = _parsed_delta(job, parser, delta.text, delta.finish_reason is not None)
            called[delta.index] |= "tool_calls" in content
            reason = _finish_reason(delta.finish_reason, called[delta.index])
        if not content and logprobs is None and delta.finish_reason is None:
            continue  # nothing to show yet (text held back for a stop string, or a parser)
        choice = {
            "index": delta.index,
            "delta": content,
            "logprobs": logprobs,
            "finish_reason": reason,
            "stop_reason": delta.stop_reason,
        }
        yield job.envelope("chat.completion.chunk", [choice])
    if job.body.include_usage:
        usage = usage_json(job.generation.usage())
        yield {**job.envelope("chat.completion.chunk", []), "usage": usage}


def _parsed_delta(job: ChatJob, parser: AnswerParser, text: str, last: bool) -> dict[str, Any]:
    """The `delta` object of the next piece of a parsed answer (and its rest when `last`)."""
    delta = parser.feed(text)
    if last:
        rest = parser.finish()
        delta = Delta(
            delta.reasoning + rest.reasoning,
            delta.content + rest.content,
            _merge_calls(delta.tool_calls + rest.tool_calls),
        )
    if not job.reading.include_reasoning:
        delta.reasoning = ""
    return delta.json()


def _merge_calls(fragments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fragments of one chunk, at most one per call (argument pieces of a call joined)."""
    merged: dict[int, dict[str, Any]] = {}
    for fragment in fragments:
        i = fragment["index"]
        if i not in merged:
            merged[i] = {**fragment, "function": dict(fragment["function"])}
        else:
            merged[i]["function"]["arguments"] += fragment["function"]["arguments"]
    return list(merged.values())
