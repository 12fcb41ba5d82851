"""Hermes-style calls (Qwen2.5, Qwen3, Hermes 2/3, and the tiny test models):

    Let me look.<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Any number of calls, anywhere in the answer; the text outside them is content. A block that
does not start as a call object of a known tool is content too.
"""

from __future__ import annotations

from common.tools.parser import Json, ToolParser, ToolScan, register_tool_parser
from common.tools.scanning import UNDECIDED, content_until, json_call

START, END = "<tool_call>", "</tool_call>"


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; structural tag: yes."""

    call_start = START
    trigger = START

    def scan(self, text: str, final: bool) -> ToolScan:
        out, pos = ToolScan(), 0
        while True:
            start = content_until(out, text, pos, START, final)
            if start is None:
                return out
            body = start + len(START)
            call = json_call(text, body, self.names)
            if call is None:  # not a call: the marker is text
                out.add_content(START)
                pos = body
                continue
            if call == UNDECIDED:
                if final:
                    out.add_content(text[start:])
                return out
            assert not isinstance(call, str)
            out.add_call(call.name, text[call.args_start : call.args_end], call.complete)
            if not call.complete:
                return out
            pos = _after_call(text, call.args_end)
            if pos < 0:
                return out  # the rest (the call's end) is not here yet, or is dropped at the end

    def tag(self, name: str, schema: Json) -> Json | None:
        return {
            "type": "tag",
            "begin": f'{START}\n{{"name": "{name}", "arguments": ',
            "content": {"type": "json_schema", "json_schema": schema},
            "end": "}\n" + END,
        }


def _after_call(text: str, pos: int) -> int:
    """Where content resumes after a call's arguments end at `pos`: after its `</tool_call>`,
    or at the next `<tool_call>` when the model left out the end tag; -1 when neither came."""
    ends = [i for i in (text.find(END, pos), text.find(START, pos)) if i >= 0]
    if not ends:
        return -1
    first = min(ends)
    return first + len(END) if text.startswith(END, first) else first
