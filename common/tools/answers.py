"""Per request: which parsers read each choice's answer, and what they change in generation
(the reasoning's end token ids for the grammar; special tokens kept for formats whose markers
are special tokens)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from common.sampling_params import SamplingParams
from common.tools.reasoning import ReasoningParser, reasoning_parser_class
from common.tools.request import ToolPlan
from common.tools.settings import ToolSettings
from common.tools.stream import AnswerParser

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast


@dataclass(slots=True)
class AnswerReading:
    """How a request's answers are read: its tool plan, and whether the model reasons (the
    server's reasoning parser, with thinking on for this prompt)."""

    plan: ToolPlan
    reasoning: type[ReasoningParser] | None
    thinking: bool
    include_reasoning: bool = True

    @classmethod
    def of(
        cls,
        plan: ToolPlan,
        settings: ToolSettings,
        prompt: str,
        template_kwargs: dict[str, Any] | None,
        include_reasoning: bool = True,
    ) -> AnswerReading:
        reasoning = None
        if settings.reasoning_parser:
            reasoning = reasoning_parser_class(settings.reasoning_parser)
        thinking = reasoning is not None and reasoning.thinking_enabled(
            prompt, template_kwargs or {}
        )
        return cls(plan, reasoning, thinking, include_reasoning)

    @property
    def active(self) -> bool:
        """Whether answers are parsed at all (else they are plain content)."""
        return self.plan.parser is not None or self.reasoning is not None

    def parser(self) -> AnswerParser | None:
        """A fresh parser for one choice (None when nothing is parsed)."""
        if not self.active:
            return None
        reasoning = None
        if self.reasoning is not None:
            starts = [self.plan.parser.call_start] if self.plan.parser is not None else []
            reasoning = self.reasoning(starts, thinking=self.thinking)
        return AnswerParser(self.plan.parser, reasoning, self.plan.max_calls)

    def adjust(self, params: SamplingParams, tokenizer: PreTrainedTokenizerFast) -> SamplingParams:
        """`params` as these parsers need them: a grammar starts after the reasoning's end
        token ids; special tokens stay in the text when the call format is made of them."""
        so = params.structured_outputs
        if so is not None and self.reasoning is not None and self.thinking:
            end = tokenizer.encode(self.reasoning.end, add_special_tokens=False)
            params = replace(params, structured_outputs=replace(so, reasoning_end=tuple(end)))
        parser = self.plan.parser
        if parser is not None and not parser.skip_special_tokens:
            params = replace(params, skip_special_tokens=False)
        return params
