"""Qwen3-Coder's XML-style calls (vLLM's `qwen3_coder` parser):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A parameter's value is raw text (one leading and one trailing newline dropped), converted by
the tool's schema: strings stay text, other types are read as JSON (text when that fails).
The arguments' JSON grows by one `"key": value` per closed parameter, so a stream sends
`{"city": "Paris"`, then `, "days": 3`, then `}`. No structural tag (the body is not JSON).
"""

from __future__ import annotations

import json
from typing import Any

import regex

from common.tools.parser import ToolParser, ToolScan, register_tool_parser
from common.tools.scanning import content_until

START, END = "<tool_call>", "</tool_call>"
FUNCTION = regex.compile(r"\s*<function=([^>\n]{1,256})>")
PARAMETER = regex.compile(r"\s*<parameter=([^>\n]{1,256})>")
PARAMETER_END, FUNCTION_END = "</parameter>", "</function>"


@register_tool_parser("qwen3_coder")
class Qwen3CoderToolParser(ToolParser):
    """`<tool_call><function=NAME><parameter=KEY>value</parameter>...</function></tool_call>`;
    structural tag: none."""

    call_start = START

    def scan(self, text: str, final: bool) -> ToolScan:
        out, pos = ToolScan(), 0
        while True:
            start = content_until(out, text, pos, START, final)
            if start is None:
                return out
            head = FUNCTION.match(text, start + len(START), partial=True)
            if head is None or (not head.partial and head.group(1) not in self.names):
                out.add_content(START)
                pos = start + len(START)
                continue
            if head.partial:
                if final:
                    out.add_content(text[start:])
                return out
            name = head.group(1)
            arguments, end = self._arguments(name, text, head.end(), final)
            out.add_call(name, arguments, end is not None or final)
            if end is None:
                return out
            close = text.find(END, end)
            if close < 0:
                return out
            pos = close + len(END)

    def _arguments(self, name: str, text: str, pos: int, final: bool) -> tuple[str, int | None]:
        """The decided arguments' JSON of the function body at `pos`, and the index after its
        `</function>` (None while it is open; then a final text closes the object)."""
        parts: list[str] = []
        while True:
            param = PARAMETER.match(text, pos, partial=True)
            if param is not None and not param.partial:
                value_end = text.find(PARAMETER_END, param.end())
                if value_end < 0:
                    break
                value = self._value(name, param.group(1), text[param.end() : value_end])
                parts.append(f"{json.dumps(param.group(1), ensure_ascii=False)}: {value}")
                pos = value_end + len(PARAMETER_END)
                continue
            close = text.find(FUNCTION_END, pos)
            if close >= 0 and (param is None or text[pos:close].strip() == ""):
                return _object(parts, closed=True), close + len(FUNCTION_END)
            break
        return _object(parts, closed=final), None

    def _value(self, function: str, key: str, raw: str) -> str:
        """A parameter's raw text as JSON, by the type its schema gives it."""
        raw = raw.removeprefix("\n").removesuffix("\n")
        schema = self.functions[function].get("parameters") or {}
        prop: Any = (schema.get("properties") or {}).get(key, {})
        kind = prop.get("type") if isinstance(prop, dict) else None
        if kind in (None, "string") or (isinstance(kind, list) and "string" in kind):
            return json.dumps(raw, ensure_ascii=False)
        try:
            return json.dumps(json.loads(raw), ensure_ascii=False)
        except (json.JSONDecodeError, RecursionError):
            return json.dumps(raw, ensure_ascii=False)


def _object(parts: list[str], closed: bool) -> str:
    """The JSON text of an object's members so far: `{"a": 1, "b": 2` (and `}` once closed)."""
    body = "{" + ", ".join(parts)
    return body + "}" if closed else body if parts else ""
