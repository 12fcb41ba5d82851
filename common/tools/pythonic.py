"""Pythonic calls (Llama 3.2 and Llama 4's "pythonic" format, vLLM's `pythonic` parser):

    [get_weather(city="Paris", days=3), get_time(zone="CET")]

optionally inside `<|python_start|>` ... `<|python_end|>`. Arguments are Python literals,
turned into JSON. Calls are recognised only at the start of the answer. Each call is decided
when its closing parenthesis is read and it parses (keyword arguments with literal values), so
it comes whole: its name and all its arguments in one delta. The format has no structural tag
(its arguments are not JSON).
"""

from __future__ import annotations

import ast
import json

import regex

from common.tools.parser import ToolParser, ToolScan, register_tool_parser
from common.tools.scanning import skip_space

BEGIN, END = "<|python_start|>", "<|python_end|>"
CALL_HEAD = regex.compile(r"\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*\(")


@register_tool_parser("pythonic")
class PythonicToolParser(ToolParser):
    """`[name(key=literal, ...), ...]` at the start of the answer; structural tag: none."""

    def scan(self, text: str, final: bool) -> ToolScan:
        out = ToolScan()
        pos = skip_space(text, 0)
        if not final and len(text) - pos < len(BEGIN) and BEGIN.startswith(text[pos:]):
            return out
        if text.startswith(BEGIN, pos):
            pos = skip_space(text, pos + len(BEGIN))
        if pos >= len(text) and not final:
            return out
        if pos >= len(text) or text[pos] != "[":
            out.add_content(text)
            return out
        end = self._calls(text, pos + 1, out)
        if end is None:
            if final and not out.calls:
                out.add_content(text)
            return out
        if end < 0:  # the first call did not parse: all content
            out.add_content(text if not out.calls else text[-end - 1 :])
            return out
        end = skip_space(text, end)
        if not final and END.startswith(text[end:]):
            return out  # maybe the end tag, still arriving
        if text.startswith(END, end):
            end += len(END)
        out.add_content(text[end:])
        return out

    def _calls(self, text: str, pos: int, out: ToolScan) -> int | None:
        """Add the list's calls from `pos`: the index after its ']', None while unfinished,
        -(i + 1) when what starts at i is no call."""
        while True:
            head = CALL_HEAD.match(text, pos, partial=True)
            if head is None:
                return -pos - 1
            if head.partial:
                return None
            end = python_call_end(text, head.end())
            if end is None:
                return None
            parsed = self._call(text[head.start(1) : end])
            if parsed is None:
                return -pos - 1
            out.add_call(parsed[0], parsed[1], True)
            pos = skip_space(text, end)
            if pos >= len(text):
                return None
            if text[pos] == "]":
                return pos + 1
            if text[pos] != ",":
                return -pos - 1
            pos += 1

    def _call(self, source: str) -> tuple[str, str] | None:
        """(name, arguments JSON) of one call's source; None when it is not a call of a known
        tool with keyword arguments holding literals."""
        try:
            node = ast.parse(source, mode="eval").body
        except SyntaxError:
            return None
        if not isinstance(node, ast.Call) or node.args:
            return None
        name = ast.unparse(node.func)
        if name not in self.names or any(k.arg is None for k in node.keywords):
            return None
        try:
            args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            return name, json.dumps(args, ensure_ascii=False)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            return None


def python_call_end(text: str, pos: int) -> int | None:
    """The index after the ')' closing a call whose arguments start at `pos` (after its '('),
    or None when the text ends first. Skips strings (with escapes) and nested brackets."""
    depth, quote, escaped = 1, "", False
    for i in range(pos, len(text)):
        c = text[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None
