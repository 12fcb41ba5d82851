"""The server's tool-calling and reasoning flags (vLLM's names), checked at startup."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.tools.parser import load_plugin, tool_parser_class
from common.tools.reasoning import reasoning_parser_class


@dataclass(slots=True)
class ToolSettings:
    """`--enable-auto-tool-choice`, `--tool-call-parser NAME`, `--tool-parser-plugin FILE`,
    `--reasoning-parser NAME`, `--exclude-tools-when-tool-choice-none`, `--strict-tool-calls`.

    `tool_choice` `auto` needs a parser and the flag; `required` and named choices need
    neither (the router constrains the answer to a JSON array of calls). `strict_tool_calls`
    constrains every `auto` call's arguments to its tool's schema (a structural tag in the
    parser's format, so the parser must have one). ValueError for an unknown parser, a plugin
    that does not load, or flags that contradict.
    """

    enable_auto_tool_choice: bool = False
    tool_call_parser: str = ""
    tool_parser_plugin: str = ""
    reasoning_parser: str = ""
    exclude_tools_when_tool_choice_none: bool = False
    strict_tool_calls: bool = False

    def __post_init__(self) -> None:
        if self.tool_parser_plugin:
            load_plugin(self.tool_parser_plugin)
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.tool_call_parser:
            parser = tool_parser_class(self.tool_call_parser)([])
            if self.strict_tool_calls and parser.tag("f", {}) is None:
                raise ValueError(
                    f"--strict-tool-calls needs a tool call parser with a structural tag form; "
                    f"{self.tool_call_parser!r} has none (hermes, llama3_json and mistral do)"
                )
        elif self.strict_tool_calls:
            raise ValueError("--strict-tool-calls needs --tool-call-parser")
        if self.reasoning_parser:
            reasoning_parser_class(self.reasoning_parser)

    def cli_args(self) -> list[str]:
        """These settings as the router's command-line words (what differs from the defaults)."""
        words: list[str] = []
        for name in ("tool_call_parser", "reasoning_parser"):
            if getattr(self, name):
                words += ["--" + name.replace("_", "-"), getattr(self, name)]
        if self.tool_parser_plugin:  # absolute: the router may run elsewhere
            words += ["--tool-parser-plugin", str(Path(self.tool_parser_plugin).resolve())]
        for name in ("enable_auto_tool_choice", "exclude_tools_when_tool_choice_none",
                     "strict_tool_calls"):  # fmt: skip
            if getattr(self, name):
                words.append("--" + name.replace("_", "-"))
        return words
