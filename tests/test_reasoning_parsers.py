"""Reasoning parsers: canonical DeepSeek-R1 and Qwen3 traces split into reasoning and content,
streamed at every character boundary and not; thinking turned off; a tool call opened inside
the reasoning is still a call (vLLM #39056)."""

from __future__ import annotations

import pytest

from common.tools import AnswerParser, reasoning_parser_class, tool_parser_class

R1 = "Okay, the user asks 2+2. That is 4.\n</think>\n\nThe answer is 4."
R1_0528 = "<think>\nFirst, add.\n</think>\n\n**4**"
QWEN3 = "<think>\nThe user greets me.\n</think>\n\nHello! How can I help?"

# (parser, text, reasoning, content)
TRACES = [
    ("deepseek_r1", R1, "Okay, the user asks 2+2. That is 4.\n", "\n\nThe answer is 4."),
    ("deepseek_r1", R1_0528, "\nFirst, add.\n", "\n\n**4**"),
    ("deepseek_r1", "Still thinking about it", "Still thinking about it", None),  # cut off
    ("qwen3", QWEN3, "\nThe user greets me.\n", "\n\nHello! How can I help?"),
    ("qwen3", "<think>\n</think>\n\nHi.", "\n", "\n\nHi."),
]


def _run(parser: AnswerParser, pieces: list[str]) -> tuple[str, str]:
    reasoning = content = ""
    for delta in [parser.feed(p) for p in pieces] + [parser.finish()]:
        reasoning += delta.reasoning
        content += delta.content
    return reasoning, content


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), TRACES)
def test_traces_split_streamed_or_not(name, text, reasoning, content) -> None:
    cls = reasoning_parser_class(name)
    whole = AnswerParser(None, cls())
    whole.feed(text)
    message = whole.result()
    assert (message.reasoning, message.content) == (reasoning, content)
    for pieces in [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]:
        assert _run(AnswerParser(None, cls()), pieces) == (reasoning, content or ""), pieces


def test_qwen3_with_thinking_off_is_all_content() -> None:
    cls = reasoning_parser_class("qwen3")
    assert not cls.thinking_enabled("<|im_start|>assistant\n<think>\n\n</think>\n\n", {})
    assert not cls.thinking_enabled("<|im_start|>assistant\n", {"enable_thinking": False})
    assert cls.thinking_enabled("<|im_start|>assistant\n", {})
    parser = AnswerParser(None, cls(thinking=False))
    parser.feed("Hi </think> there")
    assert (parser.result().reasoning, parser.result().content) == (None, "Hi </think> there")


def test_a_tool_call_inside_the_reasoning_is_parsed() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    hermes = tool_parser_class("hermes")(tools)
    text = 'I need f.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call></think>'
    for pieces in [[text[:i], text[i:]] for i in range(len(text) + 1)]:
        parser = AnswerParser(hermes, reasoning_parser_class("deepseek_r1")(["<tool_call>"]))
        reasoning = "".join(d.reasoning for d in [parser.feed(p) for p in pieces])
        reasoning += parser.finish().reasoning
        message = parser.result()
        assert reasoning == message.reasoning == "I need f.\n"
        assert message.content is None
        assert [c["function"]["arguments"] for c in message.tool_calls] == ['{"x": 1}']


def test_unknown_parser_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        reasoning_parser_class("nope")
