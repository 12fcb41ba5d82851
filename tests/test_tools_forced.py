"""Constraints that apply once the model writes a marker, through `baton serve` with the openai
client. The tiny model here has Qwen's markers as single tokens (`<tool_call>`, `</think>`), so
a `logit_bias` on one makes the random model write it: then strict `auto` constrains the call
it opened to the tool's schema, and a grammar (`response_format`, `required`) governs what
follows the reasoning while the reasoning stays free. Also `required` with parallel calls, and
tools on a server without `--enable-auto-tool-choice`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import openai
import pytest

from common.tokenizer import load_tokenizer
from engine.models.tiny import make_tiny_model
from tests.test_tools_serve import ASK, COMPACT, NO_THINKING, SCHEMAS, SEEDS, TOOLS, WEATHER
from tests.test_tools_serve import _create as create
from tests.workers import serve_colocated

MARKERS = ("<tool_call>", "</tool_call>", "<think>", "</think>")
STRICT = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
EOS = 2  # <|im_end|>
ANSWER = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}


@pytest.fixture(scope="module")
def marker_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("markers"), "qwen2", 0, added_tokens=MARKERS)


Bias = Callable[[str, int], dict[str, int]]


@pytest.fixture(scope="module")
def bias(marker_model) -> Bias:
    """`bias(marker, value)`: a logit_bias with `value` on the marker's token, whitespace
    pushed away (a structural tag's JSON takes no `disable_any_whitespace`, and the random
    model would write spaces alone until max_tokens)."""
    tokenizer = load_tokenizer(str(marker_model))
    space = {str(i): -100 for i in range(len(tokenizer))
             if (text := tokenizer.decode([i])) and text.isspace()}  # fmt: skip
    return lambda marker, value: {**space, str(tokenizer.convert_tokens_to_ids(marker)): value}


@pytest.fixture(scope="module")
def client(marker_model) -> Iterator[openai.OpenAI]:
    flags = ("--enable-auto-tool-choice", "--tool-call-parser", "hermes",
             "--reasoning-parser", "qwen3")  # fmt: skip
    with serve_colocated(marker_model, *flags) as url:
        yield openai.OpenAI(base_url=url, api_key="none", max_retries=0)


def _both(client: openai.OpenAI, **kwargs) -> tuple[dict, str | None]:
    """The non-streamed answer, checked equal to the streamed one (deltas reassembled)."""
    answer = create(client, False, **kwargs)
    assert create(client, True, **kwargs) == answer
    return answer


def _valid(calls: list[tuple[str, str]]) -> bool:
    return all(name in SCHEMAS and jsonschema.Draft202012Validator(SCHEMAS[name]).is_valid(
        json.loads(arguments)) for name, arguments in calls)  # fmt: skip


def test_strict_auto_holds_the_call_the_model_opens_to_its_schema(client, bias) -> None:
    """Biased to open `<tool_call>` at once, the model writes a call; the structural tag
    holds the name to a tool and the arguments to its schema, and ends the answer after it."""
    for seed in SEEDS:
        message, reason = _both(client, tools=STRICT, tool_choice="auto", seed=seed,
                                logit_bias=bias("<tool_call>", 100), parallel_tool_calls=False,
                                extra_body=NO_THINKING)  # fmt: skip
        assert reason == "tool_calls" and len(message["calls"]) == 1, message
        assert _valid(message["calls"]) and message["content"] is None, message


def test_strict_auto_without_the_opening_marker_is_free_text(client, bias) -> None:
    message, reason = _both(client, tools=STRICT, tool_choice="auto", seed=0,
                            logit_bias=bias("<tool_call>", -100),
                            extra_body=NO_THINKING)  # fmt: skip
    assert message["calls"] == [] and message["content"] and reason in ("stop", "length")


def _reasoned(client, bias, **kwargs) -> list[tuple[dict, str | None]]:
    """Answers with thinking on and `</think>` made likely (about one token in six), so the
    random model reasons a few tokens, then closes the reasoning (EOS pushed away: while it
    reasons it may not end, and after it only the grammar's end allows EOS)."""
    end = {**bias("</think>", 7), str(EOS): -100}
    return [_both(client, seed=seed, logit_bias=end, max_tokens=160, extra_body={},
                  **kwargs) for seed in SEEDS]  # fmt: skip


def test_a_response_format_applies_after_the_reasoning(client, bias) -> None:
    answers = _reasoned(client, bias, tools=openai.NOT_GIVEN, response_format=ANSWER)
    for message, reason in answers:
        assert reason == "stop" and message["calls"] == [], message
        assert message["content"], message
        jsonschema.validate(json.loads(message["content"]), WEATHER)
    reasonings = [message["reasoning"] for message, _ in answers]
    assert sum(bool(r) for r in reasonings) >= 3, reasonings  # free text came first


def test_required_calls_follow_the_reasoning(client, bias) -> None:
    answers = _reasoned(client, bias, tools=TOOLS, tool_choice="required",
                        parallel_tool_calls=False)  # fmt: skip
    for message, reason in answers:
        assert reason == "tool_calls" and len(message["calls"]) == 1, message
        assert _valid(message["calls"]) and message["content"] is None, message
    assert sum(bool(message["reasoning"]) for message, _ in answers) >= 3, answers


def test_required_with_parallel_calls(client) -> None:
    """Every call validates when the answer ends on its own (`tool_calls`); an answer cut off
    by max_tokens says `length`, its calls as written (the last one's arguments unfinished),
    as vLLM and OpenAI answer, streamed or not."""
    lengths = set()
    for seed in SEEDS:
        message, reason = _both(client, tool_choice="required", seed=seed, max_tokens=200,
                                extra_body=COMPACT)  # fmt: skip
        calls = message["calls"]
        assert calls and message["content"] is None, message
        if reason == "tool_calls":
            assert _valid(calls), message
        else:
            assert reason == "length" and _valid(calls[:-1]), message
        lengths.add(len(calls))
    assert max(lengths) > 1, lengths  # parallel calls came


def test_tools_without_auto_tool_choice_on_the_server(marker_model) -> None:
    with serve_colocated(marker_model) as url:
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        for choice in (openai.NOT_GIVEN, "auto"):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model="", messages=ASK, tools=TOOLS,
                                               tool_choice=choice, max_tokens=4)  # fmt: skip
            assert caught.value.body["param"] == "tool_choice", caught.value.body
            assert "--enable-auto-tool-choice" in caught.value.body["message"]
        out = client.chat.completions.create(model="", messages=ASK, tools=TOOLS, max_tokens=60,
                                             tool_choice="required", seed=0,
                                             extra_body=COMPACT)  # fmt: skip
        assert out.choices[0].message.tool_calls  # required needs no parser
