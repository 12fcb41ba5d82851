"""Reasoning parsers: the answer's reasoning (`reasoning_content`) apart from its content.

Both built-in parsers read `<think>` ... `</think>`:

- `deepseek_r1`: DeepSeek-R1 (the template opens `<think>` in the prompt; R1-0528 writes it
  again): everything before `</think>` is reasoning, an optional leading `<think>` dropped;
  an answer cut off before `</think>` is all reasoning.
- `qwen3`: the same, unless thinking is off (`chat_template_kwargs.enable_thinking` false, or
  the prompt already closed the think block, as Qwen3's template does then): all content.

As the tool parsers, a scan reports only what is decided, so streams reassemble exactly. A tool
call opened inside the reasoning (the tool parser's `call_start`, e.g. `<tool_call>`) ends the
reasoning there: the call is parsed, not lost in `reasoning_content` (vLLM #39056); a
`</think>` later in the answer is then dropped.

With structured outputs, the grammar applies after the reasoning: the router sends the end
marker's token ids as `StructuredOutputsParams.reasoning_end`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from common.tools.scanning import decided, held_back


class ReasoningScan(NamedTuple):
    """Decided prefixes of the reasoning and of the content."""

    reasoning: str
    content: str


class ReasoningParser:
    """Splits `start` ... `end` reasoning from content. `call_starts`: texts that open a tool
    call and so end the reasoning; `thinking`: False when the prompt or the request turned
    thinking off (then all is content)."""

    name = ""
    start = "<think>"
    end = "</think>"

    def __init__(self, call_starts: Sequence[str] = (), thinking: bool = True) -> None:
        self.call_starts = tuple(s for s in call_starts if s)
        self.thinking = thinking

    @classmethod
    def thinking_enabled(cls, prompt: str, template_kwargs: dict[str, object]) -> bool:
        """Whether the model will think after `prompt` (rendered with `template_kwargs`)."""
        return True

    def scan(self, text: str, final: bool) -> ReasoningScan:
        """What `text` decides; with `final` it is the whole answer."""
        if not self.thinking:
            return ReasoningScan("", text)
        body = 0
        if not final and len(text) < len(self.start) and self.start.startswith(text):
            return ReasoningScan("", "")
        if text.startswith(self.start):
            body = len(self.start)
        end = text.find(self.end, body)
        early = [i for i in (text.find(s, body) for s in self.call_starts) if i >= 0]
        if early and (end < 0 or min(early) < end):
            at = min(early)
            return ReasoningScan(text[body:at], self._after_early_end(text[at:], final))
        if end >= 0:
            return ReasoningScan(text[body:end], text[end + len(self.end) :])
        return ReasoningScan(decided(text[body:], final, self.end, *self.call_starts), "")

    def _after_early_end(self, rest: str, final: bool) -> str:
        """The content after a call ended the reasoning: `rest` less its first `end` marker."""
        i = rest.find(self.end)
        if i >= 0:
            return rest[:i] + rest[i + len(self.end) :]
        return rest if final else rest[: len(rest) - held_back(rest, self.end)]


_REASONING: dict[str, type[ReasoningParser]] = {}


ParserClassDecorator = Callable[[type[ReasoningParser]], type[ReasoningParser]]


def register_reasoning_parser(name: str) -> ParserClassDecorator:
    """Class decorator: make the class the reasoning parser called `name`."""

    def register(cls: type[ReasoningParser]) -> type[ReasoningParser]:
        cls.name = name
        _REASONING[name] = cls
        return cls

    return register


@register_reasoning_parser("deepseek_r1")
class DeepSeekR1ReasoningParser(ReasoningParser):
    """Reasoning up to `</think>` (an answer without it is all reasoning)."""


@register_reasoning_parser("qwen3")
class Qwen3ReasoningParser(ReasoningParser):
    """As deepseek_r1, unless thinking is off: `enable_thinking` false, or a prompt ending in
    `</think>` (Qwen3's template writes an empty think block then)."""

    @classmethod
    def thinking_enabled(cls, prompt: str, template_kwargs: dict[str, object]) -> bool:
        if template_kwargs.get("enable_thinking") is False:
            return False
        return not prompt.rstrip().endswith(cls.end)


def reasoning_parser_names() -> list[str]:
    return sorted(_REASONING)


def reasoning_parser_class(name: str) -> type[ReasoningParser]:
    """The reasoning parser registered as `name`; ValueError naming the known ones."""
    cls = _REASONING.get(name)
    if cls is None:
        known = ", ".join(reasoning_parser_names())
        raise ValueError(f"reasoning parser {name!r} is unknown; known: {known}")
    return cls
