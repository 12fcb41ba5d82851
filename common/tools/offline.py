"""Tool calling in the offline `LLM.chat`: the chat API's rules (common.tools.request) without
a server: the tools' plan, each prompt's reasoning, the sampling params they need, and each
completion's answer parsed into `tool_calls`, `content` and `reasoning_content`."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from common.sampling_params import SamplingParams
from common.structured_outputs import JSON_OPTIONS, StructuredOutputsParams
from common.tools.answers import AnswerReading
from common.tools.request import plan_tools
from common.tools.settings import ToolSettings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


class ToolChat:
    """One `LLM.chat` call's tool handling. ToolRequestError, a ValueError naming the field
    (the chat API's 400), for a bad request."""

    def __init__(
        self,
        tools: list[dict[str, Any]] | None,
        tool_choice: str | dict[str, Any] | None,
        parallel_tool_calls: bool | None,
        tool_parser: str | None,
        reasoning_parser: str | None,
        structured_options: dict[str, Any] | None = None,
    ) -> None:
        self.settings = ToolSettings(
            enable_auto_tool_choice=bool(tool_parser),
            tool_call_parser=tool_parser or "",
            reasoning_parser=reasoning_parser or "",
        )
        self.plan = plan_tools(tools, tool_choice, parallel_tool_calls, self.settings)
        self.options = dict(structured_options or {})
        for name in self.options:
            if name not in JSON_OPTIONS:
                raise ValueError(f"structured_options.{name}: unknown; the options are "
                                 f"{', '.join(JSON_OPTIONS)}")  # fmt: skip

    @property
    def template_tools(self) -> list[dict[str, Any]] | None:
        return self.plan.template_tools

    def reading(self, prompt: str, template_kwargs: dict[str, Any] | None) -> AnswerReading:
        return AnswerReading.of(self.plan, self.settings, prompt, template_kwargs)

    def params(
        self, params: SamplingParams, reading: AnswerReading, tokenizer: PreTrainedTokenizerFast
    ) -> SamplingParams:
        """`params` with the tools' constraint and the structured options (ValueError if
        they have their own constraint)."""
        if self.plan.constraint is not None:
            field, constraint = self.plan.constraint
            if params.structured_outputs is not None:
                raise ValueError(f"{field} and sampling_params.structured_outputs both "
                                 "constrain the output; give one")  # fmt: skip
            so = StructuredOutputsParams(**constraint, **self.options)
            params = replace(params, structured_outputs=so)
        return reading.adjust(params, tokenizer)

    def parse(self, completions: list[Any], reading: AnswerReading) -> None:
        """Set each completion's `tool_calls`, `content` and `reasoning_content`."""
        for completion in completions:
            parser = reading.parser()
            if parser is None:
                completion.content = completion.text
                continue
            parser.feed(completion.text)
            message = parser.result()
            completion.content = message.content
            completion.reasoning_content = message.reasoning
            completion.tool_calls = message.tool_calls
            if message.tool_calls and completion.finish_reason == "stop":
                completion.finish_reason = "tool_calls"
