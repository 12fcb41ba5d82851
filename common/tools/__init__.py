"""Tool calling and reasoning for the chat API: tool-call parsers (one per model family's
format, with a registry), reasoning parsers, the per-choice stream state that turns an answer
into OpenAI's deltas, and what a request's tools ask of generation (`common.tools.request`).
Torch-free: the router imports it, and so does the offline `LLM.chat`."""

from common.tools.parser import (
    CallPrefix,
    ToolParser,
    ToolScan,
    load_plugin,
    register_tool_parser,
    tool_parser_class,
    tool_parser_names,
)
from common.tools.reasoning import (
    ReasoningParser,
    reasoning_parser_class,
    reasoning_parser_names,
    register_reasoning_parser,
)
from common.tools.stream import AnswerParser, Delta, Message

__all__ = [
    "AnswerParser",
    "CallPrefix",
    "Delta",
    "Message",
    "ReasoningParser",
    "ToolParser",
    "ToolScan",
    "load_plugin",
    "reasoning_parser_class",
    "reasoning_parser_names",
    "register_reasoning_parser",
    "register_tool_parser",
    "tool_parser_class",
    "tool_parser_names",
]
