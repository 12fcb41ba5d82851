"""The tool-call parser interface and registry (vLLM's ToolParserManager, our own code).

A parser reads an answer's text as it grows and says what is decided: the content so far, and
the calls so far, each with its name and a prefix of its arguments' JSON text. Everything it
reports for a text stays true of any longer text (a monotone scan), so a stream emits exactly
the differences and reassembles, character for character, to the non-streamed answer, which is
the same scan of the whole text with `final=True`. Arguments are the model's own JSON text,
never a re-serialisation of partial JSON.

A call is decided once its head (format marker, name, the start of its arguments) is read; the
rest of its arguments follows as written. Text that cannot be a call is content.

Users add parsers with `register_tool_parser` (or `--tool-parser-plugin FILE`, a Python file
that registers some).
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

Json = dict[str, Any]


class CallPrefix(NamedTuple):
    """One call as far as it is decided: its name, a prefix of its arguments' JSON text, and
    whether the arguments are complete."""

    name: str
    arguments: str
    complete: bool


@dataclass(slots=True)
class ToolScan:
    """What a text decides: content (a prefix of the final content) and calls."""

    content: str = ""
    calls: list[CallPrefix] = field(default_factory=list)

    def add_content(self, text: str) -> None:
        self.content += text

    def add_call(self, name: str, arguments: str, complete: bool) -> None:
        self.calls.append(CallPrefix(name, arguments, complete))


class ToolParser(ABC):
    """Finds tool calls in a model's answer, written in one model family's format.

    `tools` are the request's (OpenAI's `{"type": "function", "function": {...}}`, already
    validated). `call_start` is the text that opens a call anywhere in the answer ("" when calls
    are recognised only at its start); a reasoning parser ends the reasoning there.
    `skip_special_tokens`: False when the format's markers are special tokens the detokenizer
    would otherwise drop.
    """

    name: ClassVar[str] = ""
    call_start: ClassVar[str] = ""
    skip_special_tokens: ClassVar[bool] = True
    trigger: ClassVar[str | None] = None  # structural tags: the text that opens a call

    def __init__(self, tools: Sequence[Json]) -> None:
        self.functions: dict[str, Json] = {t["function"]["name"]: t["function"] for t in tools}
        self.names = frozenset(self.functions)

    @abstractmethod
    def scan(self, text: str, final: bool) -> ToolScan:
        """What `text` decides; with `final` the text is the whole answer (all is decided)."""

    def tag(self, name: str, schema: Json) -> Json | None:
        """xgrammar's structural `tag` for one call of `name` with arguments following
        `schema` (begin, a JSON-schema body, end), or None when the format has no such form
        (its arguments are not one JSON object)."""
        return None

    def parse(self, text: str) -> ToolScan:
        """The whole answer's content and calls."""
        return self.scan(text, final=True)


ParserClass = Callable[[Sequence[Json]], ToolParser]
_PARSERS: dict[str, str | ParserClass] = {
    "hermes": "common.tools.hermes:HermesToolParser",
    "llama3_json": "common.tools.llama3_json:Llama3JsonToolParser",
    "mistral": "common.tools.mistral:MistralToolParser",
    "pythonic": "common.tools.pythonic:PythonicToolParser",
    "qwen3_coder": "common.tools.qwen3_coder:Qwen3CoderToolParser",
}


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    """Class decorator: make the class the tool parser called `name` (replacing one)."""

    def register(cls: type[ToolParser]) -> type[ToolParser]:
        cls.name = name
        _PARSERS[name] = cls
        return cls

    return register


def tool_parser_names() -> list[str]:
    return sorted(_PARSERS)


def tool_parser_class(name: str) -> ParserClass:
    """The parser registered as `name`; ValueError naming the known ones otherwise."""
    entry = _PARSERS.get(name)
    if entry is None:
        known = ", ".join(tool_parser_names())
        raise ValueError(f"tool call parser {name!r} is unknown; known: {known}")
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = _PARSERS[name] = getattr(importlib.import_module(module), attr)
    return entry


def load_plugin(path: str | Path) -> None:
    """Run the Python file `path`, whose `register_tool_parser` (or `register_reasoning_parser`)
    calls add parsers. ValueError when it cannot be loaded."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"baton_tool_plugin_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ValueError(f"tool parser plugin {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ValueError(f"tool parser plugin {str(path)!r} failed to load: {error!r}") from error
