"""Tool calls from the offline API: `LLM.chat(messages, tools=...)` parses each completion into
`tool_calls`, `content` and `reasoning_content` with the chat API's rules (required and named
choices constrained to valid calls, compact with `structured_options`); and, on the demo model
(real weights) with a hermes-style template, one whole tool conversation: a call, its result,
an answer that uses it."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from common.sampling_params import SamplingParams
from common.tools.errors import ToolRequestError
from engine import LLM
from engine.models.tiny import CHAT_TEMPLATE

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}  # fmt: skip
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": WEATHER}}]  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
COMPACT = {"disable_any_whitespace": True}  # JSON calls without free whitespace: fewer tokens


def test_offline_chat_returns_parsed_calls(tiny_model) -> None:
    llm = LLM(str(tiny_model("qwen2")), num_kv_blocks=64)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=60) for s in range(3)]
    outputs = llm.chat([ASK] * 3, params, use_tqdm=False, tools=TOOLS, tool_choice="required",
                       parallel_tool_calls=False, structured_options=COMPACT)  # fmt: skip
    for out in outputs:
        completion = out.outputs[0]
        assert completion.finish_reason == "tool_calls" and completion.content is None
        (call,) = completion.tool_calls
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    with pytest.raises(ToolRequestError, match="--enable-auto-tool-choice") as caught:
        llm.chat(ASK, tools=TOOLS, tool_choice="auto")  # auto needs a tool parser
    assert caught.value.param == "tool_choice"
    with pytest.raises(ValueError, match="structured_options.compact"):
        llm.chat(ASK, tools=TOOLS, tool_choice="required", structured_options={"compact": True})
    llm.check_integrity()


@pytest.mark.needs_engine
@pytest.mark.slow
def test_a_tool_conversation_on_the_demo_model(demo_model_dir: Path) -> None:
    """SmolLM2's own template renders no tools, so the tiny models' hermes template does."""
    llm = LLM(str(demo_model_dir), num_kv_blocks=64)
    llm.get_tokenizer().chat_template = CHAT_TEMPLATE
    greedy = SamplingParams(temperature=0, max_tokens=32)
    named = {"type": "function", "function": {"name": "get_weather"}}
    (first,) = llm.chat(ASK, greedy, use_tqdm=False, tools=TOOLS, tool_choice=named,
                        tool_parser="hermes", parallel_tool_calls=False,
                        structured_options=COMPACT)  # fmt: skip
    assert first.outputs[0].finish_reason == "tool_calls", first.outputs[0].text
    (call,) = first.outputs[0].tool_calls
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER)
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call["id"],
                "content": json.dumps({"temperature": 21, "sky": "sunny"})}]  # fmt: skip
    (second,) = llm.chat(history, greedy, use_tqdm=False, tools=TOOLS, tool_choice="auto",
                         tool_parser="hermes")  # fmt: skip
    answer = second.outputs[0]
    assert answer.tool_calls == [] and answer.content
    assert "21" in answer.content or "sunny" in answer.content.lower(), answer.content
    llm.check_integrity()
