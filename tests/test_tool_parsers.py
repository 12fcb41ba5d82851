"""Tool-call parsers: each family's canonical strings (from its public documentation and chat
templates), malformed ones (content, never an error), and every stream split: the deltas, fed
at each character boundary (and one character at a time), reassemble exactly to the
non-streamed message, and each call's first delta carries index, id, type and name."""

from __future__ import annotations

import json

import pytest

from common.tools import AnswerParser, tool_parser_class, tool_parser_names
from common.tools.json_array import JsonArrayToolParser


def _tool(name: str, properties: dict | None = None) -> dict:
    params = {"type": "object", "properties": properties or {}}
    return {"type": "function", "function": {"name": name, "parameters": params}}


TOOLS = [
    _tool("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"},
                          "metric": {"type": "boolean"}}),
    _tool("get_time", {"zone": {"type": "string"}}),
]  # fmt: skip

# (parser, text, content, [(name, arguments as JSON text)])
CANONICAL = [
    # Qwen2.5 / Hermes: the function-calling guide's output
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
     "</tool_call>", None, [("get_weather", '{"city": "Paris", "days": 3}')]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": '
     '"Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}'
     "\n</tool_call>",
     "Let me check.", [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')]),
    ("hermes", "The weather is fine.", "The weather is fine.", []),
    # Llama 3.1 JSON-based tool calling (Meta's prompt format docs)
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", '{"city": "Paris"}')]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_time", "parameters": {"zone": "UTC"}}', None,
     [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "UTC"}')]),
    ("llama3_json", "It is sunny in Paris.", "It is sunny in Paris.", []),
    # Mistral: v3 tokenizer (JSON array) and v11 (name[ARGS]{...})
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
     '{"name": "get_time", "arguments": {"zone": "CET"}}]', None,
     [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')]),
    ("mistral", 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]'
     '{"zone": "CET"}', "Sure.", [("get_weather", '{"city": "Paris"}'),
                                  ("get_time", '{"zone": "CET"}')]),
    # Llama 3.2 / Llama 4 pythonic
    ("pythonic", '[get_weather(city="Paris", days=3, metric=True), get_time(zone=\'CET\')]', None,
     [("get_weather", '{"city": "Paris", "days": 3, "metric": true}'),
      ("get_time", '{"zone": "CET"}')]),
    ("pythonic", "<|python_start|>[get_time(zone=\"UTC\")]<|python_end|>", None,
     [("get_time", '{"zone": "UTC"}')]),
    ("pythonic", "No call needed.", "No call needed.", []),
    # Qwen3-Coder's XML format (its chat template and vLLM's docs)
    ("qwen3_coder", "I will look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
     "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=metric>\ntrue\n</parameter>\n"
     "</function>\n</tool_call>", "I will look.",
     [("get_weather", '{"city": "Paris", "days": 3, "metric": true}')]),
    ("qwen3_coder", "<tool_call>\n<function=get_time>\n</function>\n</tool_call>", None,
     [("get_time", "{}")]),
]  # fmt: skip

MALFORMED = [
    ("hermes", "<tool_call>\nnot json\n</tool_call>"),
    ("hermes", '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": 5, "arguments": {}}</tool_call>'),
    ("hermes", '<tool_call>{"name": "get_weather"'),
    ("llama3_json", '{"city": "Paris"}'),
    ("mistral", "[TOOL_CALLS]oops"),
    ("mistral", '[TOOL_CALLS][{"name": "nope", "arguments": {}}]'),
    ("pythonic", "[get_weather(city=some_variable)]"),
    ("pythonic", '[get_weather("Paris")]'),
    ("pythonic", "[1, 2, 3]"),
    ("qwen3_coder", "<tool_call>\n<function=nope>\n</function>\n</tool_call>"),
]


def _parser(name: str) -> AnswerParser:
    return AnswerParser(tool_parser_class(name)(TOOLS), None)


def _reassemble(name: str, pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[dict]]:
    """Content and calls from streaming `pieces`, and each call's first delta."""
    parser, content, calls, firsts = _parser(name), "", {}, []
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    for delta in deltas:
        content += delta.content
        for fragment in delta.tool_calls:
            i = fragment["index"]
            if i not in calls:
                firsts.append(fragment)
                calls[i] = [fragment["function"]["name"], ""]
            calls[i][1] += fragment["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)], firsts


def _whole(name: str, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    parser = _parser(name)
    parser.feed(text)
    message = parser.result()
    return message.content, [(c["function"]["name"], c["function"]["arguments"])
                             for c in message.tool_calls]  # fmt: skip


@pytest.mark.parametrize(("name", "text", "content", "calls"), CANONICAL)
def test_canonical_strings(name, text, content, calls) -> None:
    assert _whole(name, text) == (content, calls)
    for _, arguments in calls:
        assert isinstance(json.loads(arguments), dict)


@pytest.mark.parametrize(("name", "text", "content", "calls"), CANONICAL)
def test_streams_split_anywhere_reassemble_exactly(name, text, content, calls) -> None:
    splits = [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]
    for pieces in splits:
        got_content, got_calls, firsts = _reassemble(name, pieces)
        assert (got_content or None, got_calls) == (content, calls), pieces
        for i, first in enumerate(firsts):
            assert first["index"] == i and first["type"] == "function"
            assert first["id"].startswith("call_") and len(first["id"]) == 29
            assert first["function"]["name"] == calls[i][0]


@pytest.mark.parametrize(("name", "text"), MALFORMED)
def test_malformed_output_is_content(name, text) -> None:
    assert _whole(name, text) == (text, [])
    for pieces in ([text[:i], text[i:]] for i in range(len(text) + 1)):
        assert _reassemble(name, pieces)[:2] == (text, [])


def test_arguments_stream_as_written_before_the_call_ends() -> None:
    """JSON formats send argument fragments as they come (never re-serialised)."""
    parser = _parser("hermes")
    first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": ')
    assert first.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": '}
    more = parser.feed('"Pa')
    assert more.tool_calls == [{"index": 0, "function": {"arguments": '"Pa'}}]
    assert parser.feed('ris"}}\n</tool_call>').tool_calls[0]["function"]["arguments"] == 'ris"}'


def test_max_calls_keeps_the_first() -> None:
    text = CANONICAL[1][1]
    parser = AnswerParser(tool_parser_class("hermes")(TOOLS), None, max_calls=1)
    parser.feed(text)
    assert [c["function"]["name"] for c in parser.result().tool_calls] == ["get_weather"]


def test_json_array_is_what_required_constrains_to() -> None:
    parser = AnswerParser(JsonArrayToolParser(TOOLS), None)
    text = '[{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_weather", ' \
        '"arguments": {}}]'
    parser.feed(text)
    message = parser.result()
    assert message.content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message.tool_calls] == [
        ("get_time", '{"zone": "UTC"}'), ("get_weather", "{}")]  # fmt: skip


def test_json_formats_declare_structural_tags() -> None:
    schema = {"type": "object"}
    have = {n for n in tool_parser_names() if tool_parser_class(n)(TOOLS).tag("f", schema)}
    assert have == {"hermes", "llama3_json", "mistral"}
    tag = tool_parser_class("hermes")(TOOLS).tag("get_time", schema)
    assert tag["begin"] == '<tool_call>\n{"name": "get_time", "arguments": '
    assert tag["end"] == "}\n</tool_call>"


def test_a_plugin_file_registers_a_parser(tmp_path) -> None:
    from common.tools.settings import ToolSettings

    plugin = tmp_path / "my_parser.py"
    plugin.write_text(
        "from common.tools import ToolParser, ToolScan, register_tool_parser\n"
        "@register_tool_parser('shouting')\n"
        "class Shouting(ToolParser):\n"
        "    def scan(self, text, final):\n"
        "        return ToolScan(text.upper())\n"
    )
    settings = ToolSettings(enable_auto_tool_choice=True, tool_call_parser="shouting",
                            tool_parser_plugin=str(plugin))  # fmt: skip
    assert "--tool-parser-plugin" in settings.cli_args()
    assert _whole("shouting", "hi") == ("HI", [])
    with pytest.raises(ValueError, match="unknown"):
        ToolSettings(tool_call_parser="nope")


def test_strict_tools_need_a_parser_with_a_structural_tag() -> None:
    from common.tools.errors import ToolRequestError
    from common.tools.request import plan_tools
    from common.tools.settings import ToolSettings

    strict = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}]
    with pytest.raises(ToolRequestError) as caught:
        plan_tools(strict, "auto", None, ToolSettings(True, "pythonic"))
    assert caught.value.param == "tools.0.function.strict"
    plan = plan_tools(strict, "auto", False, ToolSettings(True, "hermes"))
    assert plan.constraint is not None and plan.max_calls == 1
    fmt = plan.constraint[1]["structural_tag"]["format"]
    assert fmt["triggers"] == ["<tool_call>"] and fmt["stop_after_first"] is True
