"""POST /v1/completions: one or several prompts (text or token ids), n choices each.

Choice `p * n + i` is completion i of prompt p, as vLLM numbers them.
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
from router.openai.protocol import CompletionRequest
from router.openai.responses import (
    ChoiceState,
    completion_logprobs,
    sum_usage,
    usage_json,
)
from router.openai.serving import open_stream, random_id, sse_response
from router.services import RouterServices
from router.streams import merge_streams


@dataclass(slots=True)
class CompletionJob:
    """The generations of one completions request and what its responses need."""

    body: CompletionRequest
    request_id: str
    created: int
    model: str
    generations: list[Generation]
    echo_texts: list[str]  # per prompt: its text when echo is on, else ""

    def choice_index(self, prompt_index: int, delta: CompletionDelta) -> int:
        """The response's choice index of `delta` from prompt `prompt_index`."""
        return prompt_index * self.body.n + delta.index

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        """A response body (or stream chunk) around `choices`."""
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


async def create_completion(body: CompletionRequest, services: RouterServices) -> Response:
    """Validate, start every prompt's generation, answer (streamed or not)."""
    job = start_job(body, services)
    deltas = await open_stream(
        merge_streams([aiter(g) for g in job.generations]), body.constraint_field
    )
    if body.stream:
        return sse_response(_stream_events(job, deltas))
    return JSONResponse(await _collect(job, deltas))


def start_job(body: CompletionRequest, services: RouterServices) -> CompletionJob:
    """Tokenize and validate every prompt, then start their generations."""
    pre = services.preprocessor
    pre.check_model(body.model)
    params = body.to_sampling_params()
    request_id = random_id("cmpl")
    prompts = body.prompts()
    requests, echo_texts = [], []
    for p, prompt in enumerate(prompts):
        token_ids = pre.tokenize(prompt, body.add_special_tokens)
        text = prompt if isinstance(prompt, str) else None
        sub_id = request_id if len(prompts) == 1 else f"{request_id}-{p}"
        request = pre.build(
            sub_id, token_ids, params, text, body.priority, body.user or "", body.cache_salt
        )
        if body.echo and text is None:  # decoding costs milliseconds: only for echo, once valid
            request.prompt_text = text = str(services.tokenizer.decode(token_ids))
        echo_texts.append((text or "") if body.echo else "")
        requests.append(request)
    generations = [services.generator.start(r) for r in requests]
    name = services.config.served_model_name
    return CompletionJob(body, request_id, int(time.time()), name, generations, echo_texts)


async def _collect(
    job: CompletionJob, deltas: AsyncIterator[tuple[int, CompletionDelta]]
) -> dict[str, Any]:
    choices: dict[int, ChoiceState] = {}
    async for p, delta in deltas:
        index = job.choice_index(p, delta)
        if index not in choices:
            choices[index] = ChoiceState(text=job.echo_texts[p])
        choices[index].add(delta)
    body = job.envelope([_choice_json(job, i, choices[i]) for i in sorted(choices)])
    body["usage"] = usage_json(sum_usage([g.usage() for g in job.generations]))
    return body


def _choice_json(job: CompletionJob, index: int, choice: ChoiceState) -> dict[str, Any]:
    logprobs = None
    if job.body.logprobs is not None:
        logprobs = completion_logprobs(
            choice.logprob_token_ids, choice.logprobs, job.body.logprobs, 0
        )
    return {
        "index": index,
        "text": choice.text,
        "logprobs": logprobs,
        "finish_reason": choice.finish_reason,
        "stop_reason": choice.stop_reason,
    }


async def _stream_events(
    job: CompletionJob, deltas: AsyncIterator[tuple[int, CompletionDelta]]
) -> AsyncGenerator[dict[str, Any], None]:
    """One chunk per delta, then the usage chunk when stream_options.include_usage."""
    offsets: dict[int, int] = {}  # per choice: characters of token text sent so far
    async for p, delta in deltas:
        index = job.choice_index(p, delta)
        text = delta.text
        if index not in offsets:
            text = job.echo_texts[p] + text
            offsets[index] = 0
        logprobs = None
        if job.body.logprobs is not None and delta.logprobs:
            logprobs = completion_logprobs(
                delta.token_ids[: len(delta.logprobs)],
                delta.logprobs,
                job.body.logprobs,
                offsets[index],
            )
            offsets[index] += sum(len(t) for t in logprobs["tokens"])
        elif not text and delta.finish_reason is None:
            continue  # nothing to show yet (text held back for a possible stop string)
        choice = {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": delta.finish_reason,
            "stop_reason": delta.stop_reason,
        }
        yield job.envelope([choice])
    if job.body.include_usage:
        usage = sum_usage([g.usage() for g in job.generations])
        yield {**job.envelope([]), "usage": usage_json(usage)}
