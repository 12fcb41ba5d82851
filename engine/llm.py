"""The offline API, shaped like vLLM's: `LLM(model=DIR).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, cast

from tqdm.auto import tqdm

from common.sampling_params import SamplingParams
from common.tools.offline import ToolChat
from engine.llm_engine import LLMEngine, Prompt
from engine.outputs import RequestOutput, StreamOutput

Message = dict[str, Any]


class LLM:
    """Runs a model in this process. Keyword arguments are `LLMEngine.from_args`'s."""

    def __init__(self, model: str, **engine_args: Any) -> None:
        self.engine = LLMEngine.from_args(str(model), **engine_args)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs come back in prompt order.

        `priority` (one per prompt, lower first) matters under the priority policy;
        `cache_salt` keeps these requests' prefix cache apart from other salts'.
        """
        batch = _as_batch(prompts)
        params = _params_per_prompt(sampling_params, len(batch))
        if priority is not None and len(priority) != len(batch):
            raise ValueError(f"priority: got {len(priority)} values for {len(batch)} prompts")
        extra = [
            {"priority": priority[i] if priority else 0, "cache_salt": cache_salt}
            for i in range(len(batch))
        ]
        return self._run(batch, params, add_special_tokens=True, use_tqdm=use_tqdm, extra=extra)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        tool_parser: str | None = None,
        reasoning_parser: str | None = None,
        parallel_tool_calls: bool | None = None,
        structured_options: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate.

        `tools` alone are rendered by the template and the answer is text (vLLM's `LLM.chat`).
        With `tool_choice` or `tool_parser` too, `tool_choice` works as in the chat API
        (`auto`, the default then, needs `tool_parser`; `required` and named constrain the
        answer to valid calls), and each completion carries its parsed `tool_calls`, `content`
        and `reasoning_content` (common.tools, the server's parsers), as with
        `reasoning_parser`. `structured_options` shape the tools' constraint as the chat API's
        `structured_outputs` options do (`disable_any_whitespace`: compact JSON calls).
        """
        nested = bool(messages) and isinstance(messages[0], list)
        conversations = cast(list[list[Message]], messages if nested else [messages])
        parsing = tool_choice is not None or tool_parser is not None
        if not parsing and reasoning_parser is None:
            prompts: list[Prompt] = [
                self.apply_chat_template(c, tools, chat_template_kwargs) for c in conversations
            ]
            params = _params_per_prompt(sampling_params, len(prompts))
            return self._run(prompts, params, add_special_tokens=False, use_tqdm=use_tqdm)
        chat = ToolChat(tools, tool_choice, parallel_tool_calls, tool_parser, reasoning_parser,
                        structured_options)  # fmt: skip
        prompts, readings = [], []
        for c in conversations:
            prompt = self.apply_chat_template(c, chat.template_tools, chat_template_kwargs)
            prompts.append(prompt)
            readings.append(chat.reading(prompt, chat_template_kwargs))
        params = [
            chat.params(p, r, self.engine.tokenizer)
            for p, r in zip(_params_per_prompt(sampling_params, len(prompts)), readings,
                            strict=True)
        ]  # fmt: skip
        outputs = self._run(prompts, params, add_special_tokens=False, use_tqdm=use_tqdm)
        for output, reading in zip(outputs, readings, strict=True):
            chat.parse(output.outputs, reading)
        return outputs

    def stream(
        self,
        prompt: Prompt | list[Message],
        sampling_params: SamplingParams | None = None,
        chat: bool = False,
    ) -> Iterator[StreamOutput]:
        """Yield each completion's new text as it is generated (stop strings held back)."""
        engine = self.engine
        params = sampling_params or SamplingParams()
        add_special = not chat
        if chat:
            prompt = self.apply_chat_template(prompt)  # type: ignore[arg-type]
        request_id = engine.next_request_id()
        engine.add_request(request_id, prompt, params, add_special_tokens=add_special)  # type: ignore[arg-type]
        try:
            finished = False
            while not finished and engine.has_unfinished_requests():
                for state in engine.step():
                    if state.request_id == request_id:
                        yield from engine.output_processor.stream_deltas(state)
                        finished = state.finished
        finally:
            engine.abort_request([request_id])

    def apply_chat_template(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        tokenizer = self.engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages: this model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template(
            messages,
            tools=cast(Any, tools),
            tokenize=False,
            add_generation_prompt=True,
            **(chat_template_kwargs or {}),
        )
        assert isinstance(text, str)
        return text

    def reset_prefix_cache(self) -> bool:
        """Forget all cached prefix blocks; False (nothing done) while requests are running."""
        return self.engine.core.reset_prefix_cache()

    def check_integrity(self) -> None:
        """Assert the KV block pool is consistent and every block is free (tests call this)."""
        self.engine.check_integrity(expect_all_free=True)

    def _run(
        self,
        prompts: list[Prompt],
        params: list[SamplingParams],
        add_special_tokens: bool,
        use_tqdm: bool,
        extra: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        engine = self.engine
        ids = [engine.next_request_id() for _ in prompts]
        extra = extra or [{} for _ in prompts]
        added: list[str] = []
        try:
            for request_id, prompt, p, kw in zip(ids, prompts, params, extra, strict=True):
                engine.add_request(
                    request_id, prompt, p, add_special_tokens=add_special_tokens, **kw
                )
                added.append(request_id)
            return self._drain(ids, use_tqdm)
        finally:
            engine.abort_request(added)  # no-op for finished requests; frees on error

    def _drain(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while len(results) < len(ids) and self.engine.has_unfinished_requests():
                for state in self.engine.step():
                    if state.finished:
                        results[state.request_id] = state.to_output()
                        bar.update(1)
        return [results[i] for i in ids]


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # type: ignore[list-item]
    return list(prompts)  # type: ignore[arg-type]


def _params_per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"sampling_params: got {len(params)} for {n} prompts")
    return list(params)
