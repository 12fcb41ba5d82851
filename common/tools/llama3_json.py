"""Llama 3.1/3.2/3.3 JSON calls (Meta's "JSON based tool calling" prompt format):

    {"name": "get_weather", "parameters": {"city": "Paris"}}

optionally after `<|python_tag|>`, several separated by `;`. As vLLM's `llama3_json`, calls are
recognised only at the start of the answer; an answer that starts otherwise is all content.
"""

from __future__ import annotations

from common.tools.parser import Json, ToolParser, ToolScan, register_tool_parser
from common.tools.scanning import UNDECIDED, add_json_call, json_call, skip_space

PYTHON_TAG = "<|python_tag|>"


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    """`{"name": ..., "parameters": {...}}` at the start of the answer, `;`-separated;
    structural tag: yes (begin `{"name": "X", "parameters": `, trigger `{"name": `)."""

    trigger = '{"name": '

    def scan(self, text: str, final: bool) -> ToolScan:
        out = ToolScan()
        pos = skip_space(text, 0)
        rest = text[pos:]
        if not final and len(rest) < len(PYTHON_TAG) and PYTHON_TAG.startswith(rest):
            return out  # maybe the tag, still arriving
        if rest.startswith(PYTHON_TAG):
            pos += len(PYTHON_TAG)
        while True:
            call = json_call(text, pos, self.names)
            if call == UNDECIDED:
                if final and not out.calls:
                    out.add_content(text)
                return out
            if call is None:
                out.add_content(text if not out.calls else text[pos:])
                return out
            assert not isinstance(call, str)
            after = add_json_call(out, text, call)
            if after is None:
                return out
            if text[after] != ";":
                out.add_content(text[after:])
                return out
            pos = after + 1

    def tag(self, name: str, schema: Json) -> Json | None:
        return {
            "type": "tag",
            "begin": f'{{"name": "{name}", "parameters": ',
            "content": {"type": "json_schema", "json_schema": schema},
            "end": "}",
        }
