"""Mistral calls after the `[TOOL_CALLS]` control token, in both of Mistral's tokenizer
formats:

    [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]   (v3, up to v7)
    [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}                          (v11 and later)

Text before the marker is content. `[TOOL_CALLS]` is a special token, so requests parsed with
this parser keep special tokens in the detokenized text (vLLM does the same).
"""

from __future__ import annotations

import regex

from common.tools.json_array import scan_call_array
from common.tools.parser import Json, ToolParser, ToolScan, register_tool_parser
from common.tools.scanning import content_until, json_object_end, skip_space

START = "[TOOL_CALLS]"
# v11: `NAME[ARGS]{` (Magistral may put `[CALL_ID]id` between)
NAMED_HEAD = regex.compile(r"\s*([A-Za-z0-9_.\-]{1,64})(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\]\s*\{")


@register_tool_parser("mistral")
class MistralToolParser(ToolParser):
    """`[TOOL_CALLS]` then a JSON array of calls or `NAME[ARGS]{...}`; structural tag: yes
    (the v11 form)."""

    call_start = START
    trigger = START
    skip_special_tokens = False

    def scan(self, text: str, final: bool) -> ToolScan:
        out, pos = ToolScan(), 0
        while True:
            start = content_until(out, text, pos, START, final)
            if start is None:
                return out
            body = skip_space(text, start + len(START))
            if body >= len(text):
                return out
            before = len(out.calls)
            if text[body] == "[":
                end = scan_call_array(text, body, self.names, out)
                if end is not None and len(out.calls) == before:
                    end = -1
            else:
                end = self._named_call(text, body, out)
            if end is None:
                if final and len(out.calls) == before:
                    out.add_content(text[start:])
                return out
            if end == -1:  # not a call: the marker is text
                out.add_content(START)
                end = start + len(START)
            pos = end

    def _named_call(self, text: str, pos: int, out: ToolScan) -> int | None:
        """Add the v11 call at `pos`; the index after it, None while undecided or unfinished,
        -1 when it is no call."""
        match = NAMED_HEAD.match(text, pos, partial=True)
        if match is None:
            return -1
        if match.partial:
            return None
        name = match.group(1)
        if name not in self.names:
            return -1
        args_start = match.end() - 1
        args_end, complete = json_object_end(text, args_start)
        out.add_call(name, text[args_start:args_end], complete)
        return args_end if complete else None

    def tag(self, name: str, schema: Json) -> Json | None:
        return {
            "type": "tag",
            "begin": f"{START}{name}[ARGS]",
            "content": {"type": "json_schema", "json_schema": schema},
            "end": "",
        }
