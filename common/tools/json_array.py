"""Calls as a JSON array of `{"name": ..., "arguments": {...}}` objects: the answer under
tool_choice `required` or a named tool (the router constrains it to exactly this shape), and
the body of Mistral's `[TOOL_CALLS][...]`."""

from __future__ import annotations

from common.tools.parser import ToolParser, ToolScan
from common.tools.scanning import UNDECIDED, add_json_call, json_call, skip_space


def scan_call_array(
    text: str, pos: int, names: frozenset[str] | None, out: ToolScan
) -> int | None:
    """Add the calls of the array opening at `text[pos]` ('[') to `out`; the index after its
    ']' (or after the last call it could read, when what follows is no call), or None while it
    is undecided or unfinished."""
    pos += 1
    while True:
        call = json_call(text, pos, names)
        if call == UNDECIDED:
            return None
        if call is None:
            return pos
        assert not isinstance(call, str)
        close = add_json_call(out, text, call)
        if close is None:
            return None
        if text[close] == "]":
            return close + 1
        if text[close] != ",":
            return close
        pos = close + 1


class JsonArrayToolParser(ToolParser):
    """The answer is a JSON array of call objects (what `required` and named tool choices
    constrain it to). Anything after the array, or an answer that is not one, is content."""

    name = "json_array"

    def scan(self, text: str, final: bool) -> ToolScan:
        out = ToolScan()
        start = skip_space(text, 0)
        if start >= len(text):
            if final:
                out.add_content(text)
            return out
        if text[start] != "[":
            out.add_content(text)
            return out
        end = scan_call_array(text, start, self.names, out)
        if end is not None:
            out.add_content(text[end:])
        elif final and not out.calls:
            out.add_content(text)
        return out
