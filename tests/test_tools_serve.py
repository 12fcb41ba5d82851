"""Tool calling and reasoning through `baton serve` (router and a colocated worker on the
random-weight tiny model) with the official openai client: `required` and named tool choices
always give calls that validate against the tools' schemas (several seeds at temperature 1),
finishing with `tool_calls`; streamed deltas reassemble to the non-streamed calls; a
conversation carries calls and tool results; `none` never calls; `auto` answers what does not
parse as a call as content; reasoning comes apart from content; bad requests are 400s naming
the field."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from common.tools.errors import ToolRequestError
from common.tools.request import plan_tools
from common.tools.settings import ToolSettings
from tests.workers import serve_colocated

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"type": "string", "maxLength": 6}, "dst": {"type": "boolean"}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}, **NO_THINKING}
SEEDS = range(5)


@pytest.fixture(scope="module")
def server(tiny_model) -> Iterator[str]:
    flags = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes",
             "--reasoning-parser", "qwen3")  # fmt: skip
    with serve_colocated(tiny_model("qwen2"), *flags) as url:
        yield url


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server, api_key="none", max_retries=0)


def _create(client: openai.OpenAI, stream: bool, **kwargs) -> tuple[dict, str | None]:
    """The message (content, reasoning_content, tool_calls as plain data) and finish reason of
    one answer, streamed (deltas reassembled) or not."""
    kwargs = {"model": "", "messages": ASK, "temperature": 1.0, "max_tokens": 120,
              "tools": TOOLS, "extra_body": COMPACT, **kwargs}  # fmt: skip
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        message = choice.message.model_dump()
        calls = [(c["function"]["name"], c["function"]["arguments"])
                 for c in message.get("tool_calls") or []]  # fmt: skip
        reasoning = message.get("reasoning_content")
        return {"content": message["content"], "reasoning": reasoning, "calls": calls}, \
            choice.finish_reason
    return _reassemble(client.chat.completions.create(stream=True, **kwargs))


def _reassemble(chunks) -> tuple[dict, str | None]:
    content, reasoning, calls, reason = "", "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta.model_dump()
        content += delta.get("content") or ""
        reasoning += delta.get("reasoning_content") or ""
        for fragment in delta.get("tool_calls") or []:
            i = fragment["index"]
            if i not in calls:  # the first delta of a call: index, id, type and name
                assert fragment["id"].startswith("call_") and fragment["type"] == "function"
                calls[i] = [fragment["function"]["name"], ""]
            else:
                assert fragment["id"] is None and fragment["function"]["name"] is None
            calls[i][1] += fragment["function"]["arguments"] or ""
        reason = choice.finish_reason or reason
    return {"content": content or None, "reasoning": reasoning or None,
            "calls": [tuple(calls[i]) for i in sorted(calls)]}, reason  # fmt: skip


def _assert_valid(calls: list[tuple[str, str]], names: set[str]) -> None:
    assert calls
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("choice", "names"), [("required", {"get_weather", "get_time"}),
                                               (NAMED, {"get_time"})])  # fmt: skip
def test_required_and_named_calls_always_validate(client, stream, choice, names) -> None:
    for seed in SEEDS:
        message, reason = _create(client, stream, tool_choice=choice, seed=seed,
                                  parallel_tool_calls=False)  # fmt: skip
        assert reason == "tool_calls", message
        assert len(message["calls"]) == 1 and message["content"] is None
        _assert_valid(message["calls"], names)


def test_streamed_deltas_reassemble_to_the_non_streamed_calls(client) -> None:
    for seed in SEEDS:
        kwargs = {"tool_choice": "required", "seed": seed, "parallel_tool_calls": False}
        assert _create(client, True, **kwargs) == _create(client, False, **kwargs)


def test_a_conversation_with_tool_results(client) -> None:
    first, _ = _create(client, False, tool_choice=NAMED, seed=1, parallel_tool_calls=False)
    (name, arguments), = first["calls"]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"time": "12:00"}'},
    ]  # fmt: skip
    out = client.chat.completions.create(
        model="", messages=history, tools=TOOLS, tool_choice="required", max_tokens=120,
        temperature=1.0, seed=2, parallel_tool_calls=False, extra_body=COMPACT)  # fmt: skip
    assert out.choices[0].finish_reason == "tool_calls"
    calls = out.choices[0].message.tool_calls or []
    _assert_valid([(c.function.name, c.function.arguments) for c in calls], set(SCHEMAS))
    longer = out.usage.prompt_tokens
    short = client.chat.completions.create(model="", messages=ASK, tools=TOOLS, max_tokens=1,
                                           tool_choice="none", extra_body=NO_THINKING)
    assert longer > short.usage.prompt_tokens + 10  # the call and its result were rendered


@pytest.mark.parametrize("stream", [False, True])
def test_none_never_calls(client, stream) -> None:
    for seed in SEEDS:
        message, reason = _create(client, stream, tool_choice="none", seed=seed,
                                  extra_body=NO_THINKING)  # fmt: skip
        assert message["calls"] == [] and reason in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_auto_answers_text_that_is_no_call_as_content(client, stream) -> None:
    for seed in SEEDS:
        kwargs = {"tool_choice": "auto", "seed": seed, "extra_body": NO_THINKING}
        message, reason = _create(client, stream, **kwargs)
        assert message["calls"] == [] and message["content"]
        assert reason in ("stop", "length")
        assert message == _create(client, not stream, **kwargs)[0]


def test_strict_auto_sends_free_text_or_valid_calls(client) -> None:
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    for seed in SEEDS:
        message, reason = _create(client, False, tools=strict, seed=seed, extra_body=NO_THINKING)
        if message["calls"]:
            _assert_valid(message["calls"], set(SCHEMAS))
        else:
            assert message["content"]


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_comes_apart_from_content(client, stream) -> None:
    """The random model never closes its thinking: everything is reasoning (qwen3's parser);
    with thinking off, everything is content."""
    thinking, _ = _create(client, stream, tools=openai.NOT_GIVEN, seed=3, extra_body={})
    assert thinking["reasoning"] and thinking["content"] is None
    plain, _ = _create(client, stream, tools=openai.NOT_GIVEN, seed=3, extra_body=NO_THINKING)
    assert plain["content"] and plain["reasoning"] is None


ERRORS = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"minimum": "x"}}}}}]},
     "tools.0.function.parameters"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools.1.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"tool_choice": "always"}, "tool_choice"),
    ({"tools": openai.NOT_GIVEN, "tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
     "tools.0.function.strict"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "param"), ERRORS)
def test_bad_requests_are_400_naming_the_field(client, kwargs, param) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _create(client, False, **kwargs)
    assert caught.value.body["param"] == param, caught.value.body


def test_auto_without_the_servers_flag_is_refused() -> None:
    for choice in (None, "auto"):
        with pytest.raises(ToolRequestError) as caught:
            plan_tools(TOOLS, choice, None, ToolSettings())
        assert caught.value.param == "tool_choice" and "--enable-auto-tool-choice" in str(
            caught.value.message)
    assert plan_tools(TOOLS, "required", None, ToolSettings()).constraint is not None
    with pytest.raises(ValueError, match="structural tag"):
        ToolSettings(tool_call_parser="pythonic", strict_tool_calls=True)
