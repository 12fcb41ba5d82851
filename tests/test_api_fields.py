"""Nothing silently ignored, bad input never a 5xx: each request field of the OpenAI endpoints is
honoured (logit_bias forces a token), refused with a 400 naming it (not supported yet, or
unknown), or accepted as a no-op that is logged once; integers must fit their wire type and
numbers be finite; the gRPC API answers INVALID_ARGUMENT for unknown fields, undecodable bytes
and out-of-range values. Against a real router and a real colocated tiny-model worker."""

from __future__ import annotations

import json
import logging
import math
import re

import grpc
import httpx
import pytest
from transformers import AutoTokenizer

from proto.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.config import RouterConfig
from router.openai import fields
from router.openai.fields import NO_OP, NOT_SUPPORTED_YET
from router.testing import RouterThread
from tests.workers import WorkerProcess

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

# A value asking for each not-yet-supported feature.
REFUSED = {
    "guided_decoding_backend": "xgrammar",
    "structural_tag": '{"structures": []}',
    "tools": [TOOL],
    "tool_choice": "required",
    "functions": [TOOL["function"]],
    "function_call": "auto",
    "use_beam_search": True,
    "length_penalty": 0.5,
    "suffix": "!",
    "prompt_logprobs": 1,
    "bad_words": ["Paris"],
    "logits_processors": ["mod.Processor"],
    "truncate_prompt_tokens": 4,
    "return_tokens_as_token_ids": True,
    "return_token_ids": True,
    "prediction": {"type": "content", "content": "Paris"},
    "reasoning_effort": "high",
    "verbosity": "low",
    "web_search_options": {},
    "echo": True,
    "continue_final_message": True,
    "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}",
    "prompt_embeds": "AAAA",
    "mm_processor_kwargs": {"size": 1},
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "kv_transfer_params": {"do_remote_decode": True},
    "vllm_xargs": {"x": 1},
}
# known fields one endpoint honours
HONOURED_BY = {"echo": COMPLETIONS, "tools": CHAT, "tool_choice": CHAT}
# Values that ask for nothing: accepted.
NEUTRAL = {
    "tools": [],
    "tool_choice": "none",
    "use_beam_search": False,
    "length_penalty": 1,
    "modalities": ["text"],
    "echo": False,
    "guided_json": None,
    "response_format": {"type": "text"},
    "best_of": 1,
    "parallel_tool_calls": True,  # without tools
}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("qwen2")


@pytest.fixture(scope="module")
def router(model_dir):
    flags = ("--role", "colocated", "--num-kv-blocks", "64", "--max-model-len", "512")
    worker = WorkerProcess("decode_service", model_dir, *flags)
    config = RouterConfig(str(model_dir), colocated=[worker.address], port=0, grpc_port=0)
    try:
        with RouterThread(config) as thread:
            yield thread
    finally:
        worker.stop()


def _body(path: str, **fields_: object) -> dict:
    base: dict = {"prompt": "Once upon a time"} if path == COMPLETIONS else {"messages": MESSAGES}
    return {**base, "max_tokens": 2, **fields_}


def _post(router, path: str, body: dict | str) -> httpx.Response:
    if isinstance(body, str):  # raw JSON text, e.g. with NaN
        headers = {"content-type": "application/json"}
        return httpx.post(router.base_url + path, content=body, headers=headers, timeout=30)
    return httpx.post(router.base_url + path, json=body, timeout=30)


def _error(response: httpx.Response, param: str) -> dict:
    """The OpenAI error object of a 400 naming `param`."""
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return error


def test_every_not_supported_field_has_a_refusal_example():
    assert set(REFUSED) == set(NOT_SUPPORTED_YET)
    assert not set(NO_OP) & set(NOT_SUPPORTED_YET)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_fields_not_supported_yet_are_400_naming_them(router, path):
    for name, value in REFUSED.items():
        if HONOURED_BY.get(name) == path:
            continue
        error = _error(_post(router, path, _body(path, **{name: value})), name)
        assert "not supported yet" in error["message"] and name in error["message"]
        assert error["code"] == "unsupported_parameter"


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (COMPLETIONS, {"best_of": 3, "n": 2, "temperature": 1}, "best_of"),
        (COMPLETIONS, {"echo": True, "logprobs": 1}, "echo"),
        (CHAT, {"stream": True, "stream_options": {"continuous_usage_stats": True}},
         "stream_options.continuous_usage_stats"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages.0.content"),
    ],
)  # fmt: skip
def test_values_not_supported_yet_are_400_naming_the_field(router, path, extra, param):
    error = _error(_post(router, path, _body(path, **extra)), param)
    assert "not supported yet" in error["message"]


def _in(*texts: str):
    return lambda text: text in texts


# Each structured-outputs field, and what its outputs must be (tests/test_structured_api.py has
# the schemas, streaming, the prefill/decode pair and the errors).
STRUCTURED = [
    ({"structured_outputs": {"choice": ["yes", "no"]}}, _in("yes", "no")),
    ({"guided_choice": ["yes", "no"]}, _in("yes", "no")),
    ({"guided_regex": "[a-c]{1,4}"}, lambda text: re.fullmatch("[a-c]{1,4}", text)),
    ({"guided_grammar": 'root ::= "a" | "bb"'}, _in("a", "bb")),
    ({"guided_json": {"enum": ["x", "y"]}}, lambda text: json.loads(text) in ("x", "y")),
    ({"guided_json": '{"enum": [1, 2]}', "guided_whitespace_pattern": " ?"},
     lambda text: json.loads(text) in (1, 2)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "e", "schema": {
        "enum": [True, None]}}}}, lambda text: json.loads(text) in (True, None)),
    ({"response_format": {"type": "json_object"}, "max_tokens": 200},
     lambda text: text.startswith("{")),
]  # fmt: skip


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
@pytest.mark.parametrize(("extra", "valid"), STRUCTURED)
def test_structured_outputs_fields_are_honoured(router, path, extra, valid):
    body = _body(path, **{"max_tokens": 30, "temperature": 1.0, **extra})
    response = _post(router, path, body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    text = choice["text"] if path == COMPLETIONS else choice["message"]["content"]
    assert valid(text), (extra, text)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_values_that_ask_for_nothing_are_accepted(router, path):
    for name, value in NEUTRAL.items():
        response = _post(router, path, _body(path, **{name: value}))
        assert response.status_code == 200, (name, response.text)


def test_chat_tools_with_tool_choice_none_are_rendered(router):
    usage = [
        _post(router, CHAT, _body(CHAT, **extra)).json()["usage"]["prompt_tokens"]
        for extra in ({}, {"tools": [TOOL], "tool_choice": "none"})
    ]
    assert usage[0] < usage[1]  # the template wrote the tools into the prompt


@pytest.mark.parametrize(
    ("path", "extra", "param", "hint"),
    [
        (COMPLETIONS, {"temprature": 0.5}, "temprature", "temperature"),
        (CHAT, {"max_complete_tokens": 5}, "max_complete_tokens", "max_completion_tokens"),
        (CHAT, {"frobnicate": True}, "frobnicate", None),
        (COMPLETIONS, {"messages": MESSAGES}, "messages", None),  # the other endpoint's field
        (CHAT, {"stream": True, "stream_options": {"include_usge": True}},
         "stream_options.include_usge", None),
        (CHAT, {"response_format": {"type": "text", "schema": {}}}, "response_format.schema",
         None),
    ],
)  # fmt: skip
def test_unknown_fields_are_400_naming_them(router, path, extra, param, hint):
    error = _error(_post(router, path, _body(path, **extra)), param)
    assert error["message"].startswith(f"unknown field '{param}'")
    assert error["code"] == "unknown_parameter"
    if hint:
        assert f"did you mean '{hint}'" in error["message"]


def test_no_op_fields_are_accepted_and_logged_once(router, caplog, monkeypatch):
    monkeypatch.setattr(fields, "_logged_no_ops", set())
    caplog.set_level(logging.WARNING, logger=fields.__name__)
    body = _body(CHAT, store=True, metadata={"k": "v"}, service_tier="auto", request_id="r1")
    for _ in range(3):
        assert _post(router, CHAT, body).status_code == 200
    assert _post(router, COMPLETIONS, _body(COMPLETIONS, user="u", store=False)).status_code == 200
    logged = [r.getMessage() for r in caplog.records if r.name == fields.__name__]
    for name in ("store", "metadata", "service_tier", "request_id"):
        assert sum(f"field {name!r}" in message for message in logged) == 1, logged
    assert len(logged) == 4


INT32, INT64 = 2**31, 2**63


@pytest.mark.parametrize(
    ("path", "name", "ok", "bad"),
    [
        (COMPLETIONS, "top_k", INT32 - 1, INT32),
        (COMPLETIONS, "max_tokens", INT32 - 1, INT32),
        (CHAT, "max_completion_tokens", INT32 - 1, INT32),
        (COMPLETIONS, "priority", INT32 - 1, INT32),
        (CHAT, "priority", -INT32, -INT32 - 1),
        (COMPLETIONS, "seed", INT64 - 1, INT64),
        (CHAT, "seed", -INT64, -INT64 - 1),
        (COMPLETIONS, "n", None, INT32),
        (COMPLETIONS, "min_tokens", None, INT32),
        (COMPLETIONS, "logprobs", None, INT32),
        (COMPLETIONS, "best_of", None, INT32),
    ],
)
def test_integers_must_fit_their_wire_type(router, path, name, ok, bad):
    if ok is not None:
        response = _post(router, path, _body(path, **{name: ok}))
        assert response.status_code == 200, response.text
    _error(_post(router, path, _body(path, **{name: bad})), name)


def test_all_n_seeds_must_fit_int64(router):
    body = _body(COMPLETIONS, n=2, temperature=1.0)
    assert _post(router, COMPLETIONS, {**body, "seed": INT64 - 2}).status_code == 200
    error = _error(_post(router, COMPLETIONS, {**body, "seed": INT64 - 1}), "seed")
    assert "n=2" in error["message"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stop_token_ids": [INT32]}, "stop_token_ids.0"),
        ({"allowed_token_ids": [-INT32 - 1]}, "allowed_token_ids.0"),
        ({"logit_bias": {str(INT32): 1}}, "logit_bias"),
        ({"prompt": [INT32]}, "prompt"),
        ({"prompt": [[1, 2], [-1]]}, "prompt"),
    ],
)
def test_token_ids_out_of_range_are_400(router, extra, param):
    _error(_post(router, COMPLETIONS, _body(COMPLETIONS, **extra)), param)


@pytest.mark.parametrize(
    ("text", "param"),
    [
        ('"temperature": NaN', "temperature"),
        ('"top_p": Infinity', "top_p"),
        ('"presence_penalty": -Infinity', "presence_penalty"),
        ('"logit_bias": {"5": NaN}', "logit_bias.5"),
        ('"repetition_penalty": 1e999', "repetition_penalty"),
    ],
)
def test_numbers_must_be_finite(router, text, param):
    body = '{"prompt": "Once", "max_tokens": 2, ' + text + "}"
    error = _error(_post(router, COMPLETIONS, body), param)
    assert "finite" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
        ('{"prompt": "a", "max_tokens": 2, "user": "\\udfff"}', "user"),
        ('{"prompt": "a", "max_tokens": 2, "st\\udc00op": "x"}', "st\\udc00op"),
        ('{"prompt": "a", "max_tokens": 2, "metadata": ' + "[" * 70 + "]" * 70 + "}",
         "metadata" + ".0" * 63),
    ],
)  # fmt: skip
def test_text_that_is_not_unicode_and_deep_nesting_are_400(router, body, param):
    _error(_post(router, COMPLETIONS, body), param)


def test_a_body_over_the_limit_is_413_and_the_connection_serves_on(router):
    from router.openai.app import MAX_BODY_BYTES

    content = json.dumps(_body(COMPLETIONS, prompt="a" * MAX_BODY_BYTES)).encode()
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=router.base_url, timeout=60, headers=headers) as client:
        declared = client.post(COMPLETIONS, content=content)  # with its Content-Length
        chunked = client.post(COMPLETIONS, content=iter([content[:1000], content[1000:]]))
        for response in (declared, chunked):
            assert response.status_code == 413, response.text
            assert response.json()["error"]["type"] == "invalid_request_error"
        assert client.post(COMPLETIONS, json=_body(COMPLETIONS)).status_code == 200


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_logit_bias_forces_a_token(router, model_dir, path):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    token = tokenizer.encode(" of")[0]
    greedy = _body(path, max_tokens=4, temperature=0)
    biased = {**greedy, "logit_bias": {str(token): 100}}
    texts = []
    for body in (greedy, biased):
        response = _post(router, path, body).json()
        choice = response["choices"][0]
        texts.append(choice["text"] if path == COMPLETIONS else choice["message"]["content"])
    assert texts[1] == tokenizer.decode([token] * 4) != texts[0]


def _grpc_call(router, request: bytes | router_pb2.GenerateRequest) -> list:
    """Generate's responses; `request` bytes go on the wire as they are."""
    channel = grpc.insecure_channel(router.grpc_address)
    if isinstance(request, bytes):
        call = channel.unary_stream("/baton.v1.Router/Generate")
        return list(call(request, timeout=30))
    return list(router_pb2_grpc.RouterStub(channel).Generate(request, timeout=30))


def _grpc_error(router, request: bytes | router_pb2.GenerateRequest) -> str:
    """The details of an INVALID_ARGUMENT answer."""
    with pytest.raises(grpc.RpcError) as raised:
        _grpc_call(router, request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value
    return raised.value.details()


def _request(**params: object) -> router_pb2.GenerateRequest:
    params = {"max_tokens": 2, **params}
    return router_pb2.GenerateRequest(
        text="Once upon a time", params=common_pb2.SamplingParams(**params)
    )


def test_grpc_unknown_fields_and_undecodable_bytes_are_invalid_argument(router):
    valid = _request().SerializeToString()
    assert _grpc_call(router, valid)  # the raw path itself works
    field_99 = b"\x98\x06\x01"  # field 99, varint 1
    assert "field number 99" in _grpc_error(router, valid + field_99)
    params = common_pb2.SamplingParams(max_tokens=2).SerializeToString() + field_99
    nested = router_pb2.GenerateRequest(text="Once").SerializeToString()
    nested += b"\x32" + bytes([len(params)]) + params  # field 6 (params), length-delimited
    assert "field number 99 in params" in _grpc_error(router, nested)
    bad_utf8 = b"\x1a\x02\xff\xfe"  # text (field 3) = two bytes that are not UTF-8
    assert "UTF-8" in _grpc_error(router, bad_utf8)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"n": 129, "temperature": 1.0}, "n"),
        ({"seed": INT64 - 1, "n": 2, "temperature": 1.0}, "seed"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": math.inf}, "top_p"),
        ({"logit_bias": {5: math.nan}}, "logit_bias"),
        ({"top_k": -2}, "top_k"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"logprobs": INT32 - 1}, "logprobs"),
        ({"stop_token_ids": [INT32 - 1]}, "stop_token_ids"),
    ],
)
def test_grpc_values_out_of_range_are_invalid_argument(router, params, field):
    assert field in _grpc_error(router, _request(**params))


def test_grpc_range_edges_are_served(router):
    for params in ({"seed": INT64 - 1}, {"seed": -INT64}, {"top_k": INT32 - 1}):
        assert _grpc_call(router, _request(**params))
    request = _request(max_tokens=INT32 - 1)
    request.priority = -INT32
    assert _grpc_call(router, request)
