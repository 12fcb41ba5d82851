"""Reading model output that is still arriving: what part of a text is decided.

A parser scans the whole text so far and reports only what no later text can change (the
decided prefix). These helpers find markers that may still be cut off at the end, the end of a
JSON object, and the head of a JSON call object (`{"name": "...", "arguments": {`), with
`regex`'s partial matching telling "may still match" from "cannot match".
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, NamedTuple

import regex

if TYPE_CHECKING:
    from common.tools.parser import ToolScan

# `{"name": "NAME", "arguments": {` (or "parameters", Llama's key); group 1: NAME's JSON text
CALL_HEAD = regex.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*\{'
)


def held_back(text: str, *markers: str) -> int:
    """How many characters at the end of `text` may be the start of one of `markers` (and so
    are not decided yet)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:n]):
                longest = n
                break
    return longest


def decided(text: str, final: bool, *markers: str) -> str:
    """`text` less a tail that may be the start of one of `markers` (all of it when final)."""
    return text if final else text[: len(text) - held_back(text, *markers)]


def json_object_end(text: str, start: int) -> tuple[int, bool]:
    """Where the JSON object opening at `text[start]` ('{') ends: (index after its '}', True),
    or (len(text), False) while it is unfinished. Counts brackets outside strings; the object's
    validity is not checked."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1, True
    return len(text), False


class JsonCall(NamedTuple):
    """A call object's head read: its name and where its arguments object starts and ends."""

    name: str
    args_start: int
    args_end: int
    complete: bool  # the arguments object is closed


UNDECIDED = "undecided"  # the text ends where a call head may still come


def json_call(text: str, pos: int, names: frozenset[str] | None) -> JsonCall | str | None:
    """The call object starting at `text[pos]` (after whitespace): a JsonCall; UNDECIDED while
    the text so far may still be a call's head; None when it cannot be one (not that shape, not
    a JSON string name, or a name outside `names` when given)."""
    match = CALL_HEAD.match(text, pos, partial=True)
    if match is None:
        return None
    if match.partial:
        return UNDECIDED
    name = json_string(match.group(1))
    if name is None or (names is not None and name not in names):
        return None
    args_start = match.end() - 1
    args_end, complete = json_object_end(text, args_start)
    return JsonCall(name, args_start, args_end, complete)


def json_string(raw: str) -> str | None:
    """The value of a JSON string's inner text (escapes decoded); None when malformed."""
    try:
        value = json.loads(f'"{raw}"')
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, str) else None


def skip_space(text: str, pos: int) -> int:
    """The index of the first non-whitespace character at or after `pos`."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def content_until(out: ToolScan, text: str, pos: int, marker: str, final: bool) -> int | None:
    """Add the content from `pos` to the next `marker` to `out`; the marker's index, or None
    when there is none (the decided rest of the text added: a cut-off marker is held back)."""
    start = text.find(marker, pos)
    if start < 0:
        out.add_content(decided(text[pos:], final, marker))
        return None
    out.add_content(text[pos:start])
    return start


def add_json_call(out: ToolScan, text: str, call: JsonCall) -> int | None:
    """Add `call` to `out`; the index of what follows it (past spaces, and a '}' that wraps the
    call object), None while the call is unfinished or nothing follows it yet."""
    out.add_call(call.name, text[call.args_start : call.args_end], call.complete)
    if not call.complete:
        return None
    after = skip_space(text, call.args_end)
    if after < len(text) and text[after] == "}":
        after = skip_space(text, after + 1)
    return after if after < len(text) else None
