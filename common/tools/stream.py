"""One choice's answer read as it streams: reasoning, content and tool calls as OpenAI deltas.

`AnswerParser.feed(text)` takes the next piece of the answer and returns the delta it decides
(reasoning, content, tool-call fragments); `finish()` returns the rest once the answer is whole.
`result()` is the whole message, the same scan of the whole text: the deltas reassemble to it
exactly. The first delta of a call carries its index, id (`call_` + 24 hex digits), type and
name; the next ones carry argument fragments only.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from common.tools.parser import ToolParser, ToolScan
from common.tools.reasoning import ReasoningParser, ReasoningScan

Json = dict[str, Any]


def call_id() -> str:
    """A tool call id, as OpenAI's (`call_` and random hex)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class Message:
    """A parsed answer: reasoning (None without any), content (None when empty beside calls or
    reasoning), and the calls as OpenAI's `tool_calls` objects."""

    reasoning: str | None
    content: str | None
    tool_calls: list[Json]


@dataclass(slots=True)
class Delta:
    """What one piece of the answer adds (empty strings and lists: nothing)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[Json] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def json(self) -> Json:
        """OpenAI's `delta` object for it."""
        out: Json = {}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        if self.content:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


class AnswerParser:
    """Reasoning and tool parsing of one choice (either parser may be None). `max_calls`: the
    most calls kept (1 when parallel_tool_calls is false); later ones are left out."""

    def __init__(
        self,
        tools: ToolParser | None,
        reasoning: ReasoningParser | None,
        max_calls: int | None = None,
    ) -> None:
        self.tools = tools
        self.reasoning = reasoning
        self.max_calls = max_calls
        self.text = ""
        self._sent_reasoning = 0
        self._sent_content = 0
        self._sent_args: list[int] = []  # argument characters sent, per call
        self._ids: list[str] = []

    def feed(self, text: str) -> Delta:
        """The delta that `text`, the answer's next piece, decides."""
        self.text += text
        return self._delta(final=False)

    def finish(self) -> Delta:
        """The rest, now that the answer is whole."""
        return self._delta(final=True)

    def result(self) -> Message:
        """The whole answer's message (after `finish`, or of the text fed so far as if whole)."""
        reasoning, scan = self._scan(final=True)
        content = self._content(scan, final=True)
        calls = [self._call_json(i, c.name, c.arguments) for i, c in enumerate(scan.calls)]
        return Message(
            reasoning.reasoning or None,
            content or (None if calls or reasoning.reasoning else content),
            calls,
        )

    def _scan(self, final: bool) -> tuple[ReasoningScan, ToolScan]:
        if self.reasoning is None:
            reasoning = ReasoningScan("", self.text)
        else:
            reasoning = self.reasoning.scan(self.text, final)
        if self.tools is None:
            return reasoning, ToolScan(reasoning.content)
        scan = self.tools.scan(reasoning.content, final)
        if self.max_calls is not None:
            del scan.calls[self.max_calls :]
        return reasoning, scan

    def _content(self, scan: ToolScan, final: bool) -> str:
        """Decided content: trailing whitespace waits for more text, and beside calls it is
        dropped (the newlines around a call's tags are not content)."""
        if self.tools is None or (final and not scan.calls):
            return scan.content
        return scan.content.rstrip()

    def _delta(self, final: bool) -> Delta:
        reasoning, scan = self._scan(final)
        content = self._content(scan, final)
        delta = Delta(
            reasoning.reasoning[self._sent_reasoning :], content[self._sent_content :]
        )
        self._sent_reasoning = len(reasoning.reasoning)
        self._sent_content = len(content)
        for i, call in enumerate(scan.calls):
            if i == len(self._ids):
                self._ids.append(call_id())
                self._sent_args.append(0)
                fragment = {"index": i, **self._call_json(i, call.name, call.arguments)}
            elif len(call.arguments) > self._sent_args[i]:
                args = call.arguments[self._sent_args[i] :]
                fragment = {"index": i, "function": {"arguments": args}}
            else:
                continue
            self._sent_args[i] = len(call.arguments)
            delta.tool_calls.append(fragment)
        return delta

    def _call_json(self, index: int, name: str, arguments: str) -> Json:
        while len(self._ids) <= index:
            self._ids.append(call_id())
        return {
            "id": self._ids[index],
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
