"""Structured outputs through the router, against real worker processes (a prefill/decode pair
and a colocated worker) on the random-weight tiny model at temperature 1, with the official
openai client: response_format json_schema outputs validate (every schema of the engine's
suite), choices are exact, regexes full-match, streamed and not; vLLM's structured_outputs object
and guided_* aliases; structural tags in both of vLLM's forms; the gRPC API's proto field. A spec
the worker's grammar backend cannot compile is a 400 (gRPC INVALID_ARGUMENT) naming the field the
client used; two constraints, a malformed structural tag and a per-request backend are 400s;
nothing leaks."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import openai
import pytest

from proto.baton.v1 import common_pb2, router_pb2, router_pb2_grpc
from router.testing import RouterThread
from tests.test_structured_outputs import SCHEMAS
from tests.workers import assert_all_free, pd_and_colocated_routers, started_at_once

NUM_BLOCKS = 64
FLAGS = ("--num-kv-blocks", str(NUM_BLOCKS))
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
# Finite: every output completes (and so parses) within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob", "cy"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
REGEX = r"[a-d]{2,5}-[0-9]{1,3}"
CHOICES = ["yes", "no", "maybe not"]
FORMATS = jsonschema.FormatChecker()


@pytest.fixture(scope="module")
def workers(tiny_model):
    model_dir = tiny_model("qwen2")
    specs = {
        "decode": ("decode_service", FLAGS),
        "prefill": ("prefill_service", FLAGS),
        "colocated": ("decode_service", (*FLAGS, "--role", "colocated")),
    }
    with started_at_once(model_dir, specs) as addresses:
        yield model_dir, addresses


@pytest.fixture(scope="module")
def routers(workers):
    with pd_and_colocated_routers(*workers) as threads:
        yield threads


@pytest.fixture(params=["disaggregated", "colocated"])
def router(request, routers) -> RouterThread:
    return routers[request.param]


def _client(router: RouterThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.base_url}/v1", api_key="none", max_retries=0)


def _chat(client: openai.OpenAI, stream: bool, **kwargs) -> tuple[str, str | None]:
    """The text and finish reason of one chat completion (streamed or not)."""
    kwargs = {"model": "", "messages": CHAT, "temperature": 1.0, "max_tokens": 60, **kwargs}
    if not stream:
        out = client.chat.completions.create(**kwargs)
        return out.choices[0].message.content or "", out.choices[0].finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    return text, chunks[-1].choices[0].finish_reason


def _completion(client: openai.OpenAI, stream: bool, **kwargs) -> list[tuple[str, str | None]]:
    """(text, finish reason) of each choice of one completion (streamed or not)."""
    kwargs = {"model": "", "prompt": "Once", "temperature": 1.0, "max_tokens": 60, **kwargs}
    if not stream:
        out = client.completions.create(**kwargs)
        return [(c.text, c.finish_reason) for c in out.choices]
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    for chunk in client.completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    return [(texts[i], reasons[i]) for i in sorted(texts)]


def _schema_format(strict: bool = True) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": SCHEMA, "strict": strict},
    }


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_outputs_validate(router, stream):
    client = _client(router)
    for seed in range(3):
        text, reason = _chat(
            client, stream, response_format=_schema_format(), seed=seed, extra_body=COMPACT
        )
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    body = {"response_format": _schema_format(False), **COMPACT}  # not in the client's types
    outputs = _completion(client, stream, n=2, extra_body=body)
    for text, reason in outputs:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_every_schema_of_the_engine_suite_validates(router, stream):
    """tests/test_structured_outputs.py's SCHEMAS (all finite: compact outputs end within
    max_tokens), sent at once as strict json_schema formats."""
    client = _client(router)

    def ask(seed: int, name: str) -> tuple[str, str | None]:
        schema = {"name": name, "schema": SCHEMAS[name], "strict": True}
        fmt = {"type": "json_schema", "json_schema": schema}
        return _chat(
            client, stream, response_format=fmt, seed=seed, max_tokens=200, extra_body=COMPACT
        )

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:
        outputs = dict(zip(SCHEMAS, pool.map(ask, range(len(SCHEMAS)), SCHEMAS), strict=True))
    for name, (text, reason) in outputs.items():
        assert reason == "stop", (name, text)
        jsonschema.validate(json.loads(text), SCHEMAS[name], format_checker=FORMATS)


@pytest.mark.parametrize("stream", [False, True])
def test_choice_regex_and_json_object(router, stream):
    client = _client(router)
    for seed in range(3):
        text, reason = _chat(client, stream, seed=seed, extra_body={"guided_choice": CHOICES})
        assert text in CHOICES and reason == "stop"
        body = {"structured_outputs": {"regex": REGEX}}
        [(text, reason)] = _completion(client, stream, seed=seed, extra_body=body)
        assert re.fullmatch(REGEX, text) and reason == "stop", text
    [(text, _)] = _completion(client, stream, extra_body={"guided_regex": REGEX}, seed=7)
    assert re.fullmatch(REGEX, text), text
    text, reason = _chat(
        client, stream, response_format={"type": "json_object"}, max_tokens=400,
        extra_body={"structured_outputs": {"disable_any_whitespace": True}},
    )  # fmt: skip
    if reason == "stop":  # any JSON object may be long: it parses when it completed
        assert isinstance(json.loads(text), dict)


def _assert_400(call, param: str, *words: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    error = info.value.body
    assert error["param"] == param, error
    for word in words:
        assert word in error["message"], error


@pytest.mark.parametrize("stream", [False, True])
def test_specs_the_backend_cannot_compile_are_400_naming_the_field(router, workers, stream):
    client = _client(router)
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    cases = [
        ({"guided_regex": "(unclosed"}, "guided_regex"),
        ({"structured_outputs": {"regex": "[z-a]"}}, "structured_outputs.regex"),
        ({"response_format": bad_schema}, "response_format.json_schema.schema"),
        ({"guided_grammar": "root ::= undefined_rule"}, "guided_grammar"),
    ]
    for body, param in cases:
        for send in (_chat, _completion):
            with pytest.raises(openai.BadRequestError) as info:
                send(client, stream, extra_body=body)
            error = info.value.body
            assert error["param"] == param and "cannot compile" in error["message"], error
    text, _ = _chat(client, stream, extra_body={"guided_choice": CHOICES})  # still serving
    assert text in CHOICES
    assert_all_free(workers[1], NUM_BLOCKS)


def test_two_constraints_and_malformed_specs_are_400(router):
    client = _client(router)
    two = {"response_format": _schema_format(), "extra_body": {"guided_regex": "a+"}}
    _assert_400(lambda: _chat(client, False, **two), "guided_regex", "both constrain")
    body = {"structured_outputs": {"choice": ["a"], "regex": "a"}}
    _assert_400(
        lambda: _completion(client, False, extra_body=body), "structured_outputs.choice",
        "both constrain",
    )  # fmt: skip
    _assert_400(
        lambda: _chat(client, False, extra_body={"guided_json": "{not json"}),
        "guided_json", "not valid JSON",
    )  # fmt: skip
    _assert_400(
        lambda: _chat(client, False, response_format={"type": "json_schema"}),
        "response_format.json_schema.schema",
    )
    _assert_400(
        lambda: _chat(client, False, extra_body=COMPACT),
        "structured_outputs.disable_any_whitespace",
    )
    _assert_400(
        lambda: _chat(client, False, extra_body={"guided_choice": []}), "guided_choice", "empty"
    )
    deep = {"structured_outputs": {"structural_tag": "[" * 100_000}}  # past json.loads' recursion
    _assert_400(lambda: _chat(client, False, extra_body=deep), "structured_outputs.structural_tag")
    _assert_400(
        lambda: _chat(client, False, extra_body={"guided_json": "[" * 100_000}), "guided_json"
    )


WEATHER = {
    "type": "object",
    "properties": {"city": {"enum": ["paris", "rome"]}},
    "required": ["city"],
    "additionalProperties": False,
}
BEGIN, END = "<function=get_weather>", "</function>"
# xgrammar's form: a tag at once (at_least_one), and nothing after it (stop_after_first).
FORCED_TAG = {
    "type": "structural_tag",
    "format": {
        "type": "triggered_tags",
        "triggers": ["<function="],
        "tags": [{"begin": BEGIN, "content": {"type": "json_schema", "json_schema": WEATHER},
                  "end": END}],
        "at_least_one": True,
        "stop_after_first": True,
    },
}  # fmt: skip
# vLLM's legacy form, with a trigger the random model writes often in its free text.
LEGACY_TAG = {
    "type": "structural_tag",
    "structures": [{"begin": "e<weather>", "schema": WEATHER, "end": "</weather>"}],
    "triggers": ["e"],
}


@pytest.mark.parametrize("stream", [False, True])
def test_structural_tag_format_forces_a_tag_whose_body_validates(router, stream):
    client = _client(router)
    for seed in range(3):
        text, reason = _chat(client, stream, response_format=FORCED_TAG, seed=seed, max_tokens=150)
        free, _, tagged = text.partition(BEGIN)
        assert reason == "stop" and "<function=" not in free and tagged.endswith(END), text
        jsonschema.validate(json.loads(tagged.removesuffix(END)), WEATHER)


def _tagged_bodies(text: str, trigger: str, begin: str, end: str) -> tuple[list[str], str]:
    """The bodies of the tags in `text` (free text and tags, each `begin` body `end`), and the
    tail of a tag left unfinished; AssertionError where free text holds a trigger that begins
    no tag."""
    bodies = []
    while (start := text.find(trigger)) >= 0:
        text = text[start:]
        stop = text.find(end, len(begin))
        if stop < 0 or not text.startswith(begin):
            assert text.startswith(begin) or begin.startswith(text), text
            return bodies, text
        bodies.append(text[len(begin) : stop])
        text = text[stop + len(end) :]
    return bodies, ""


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_structural_tag_free_text_then_tags_whose_bodies_validate(router, stream):
    """In response_format, and as JSON text in structured_outputs.structural_tag."""
    client = _client(router)
    bodies, free_first = 0, 0
    for seed in range(4):
        tag = {"structural_tag": json.dumps(LEGACY_TAG)}
        body = {"response_format": LEGACY_TAG} if seed % 2 else {"structured_outputs": tag}
        [(text, reason)] = _completion(client, stream, seed=seed, max_tokens=80, extra_body=body)
        found, unfinished = _tagged_bodies(text, "e", "e<weather>", "</weather>")
        for found_body in found:
            jsonschema.validate(json.loads(found_body), WEATHER)
        assert not unfinished or reason == "length", text
        bodies += len(found)
        free_first += not text.startswith("e<weather>")
    assert bodies and free_first, "no tag completed, or none after free text"


def test_malformed_structural_tags_and_a_backend_per_request_are_400(router):
    client = _client(router)
    tag = {"begin": "<f=a>", "schema": WEATHER, "end": "</f>"}

    def legacy(**change) -> dict:
        return {"type": "structural_tag", "structures": [tag], "triggers": ["<f="], **change}

    triggered = {
        "type": "triggered_tags",
        "triggers": ["<g"],
        "tags": [
            {"begin": "<f>", "content": {"type": "const_string", "value": "x"}, "end": "</f>"}
        ],
    }
    rf = "response_format"
    cases = [
        ({"type": "structural_tag"}, f"{rf}.format", "needs format"),
        ({"type": "structural_tag", "format": ["x"]}, f"{rf}.format", "an object with a type"),
        (legacy(format=triggered), f"{rf}.structures", "not both"),
        (legacy(structures=[]), f"{rf}.structures", "non-empty list"),
        (legacy(triggers="<f="), f"{rf}.triggers", "non-empty list"),
        (legacy(triggers=[""]), f"{rf}.triggers.0", "non-empty string"),
        (legacy(triggers=["<f=", "<g"]), f"{rf}.triggers.1", "prefix of some begin"),
        (legacy(triggers=["<f", "<f="]), f"{rf}.structures.0.begin", "exactly one"),
        (legacy(structures=[{**tag, "begin": 3}]), f"{rf}.structures.0.begin", "non-empty"),
        (legacy(structures=[{**tag, "schema": None}]), f"{rf}.structures.0.schema", "object"),
        (legacy(structures=[{"begin": "<f=a>", "schema": {}}]), f"{rf}.structures.0.end", ""),
        (legacy(structures=[{**tag, "content": {}}]), f"{rf}.structures.0.content", "unknown"),
        (legacy(structures=["<f=a>"]), f"{rf}.structures.0", "an object"),
        (legacy(at_least_one=True), f"{rf}.at_least_one", "unknown field"),
        ({"type": "structural_tag", "format": {"type": "sequence", "elements": [triggered]}},
         f"{rf}.format.elements.0.triggers.0", "prefix of some begin"),
        ({"type": "structural_tag", "json_schema": {"name": "x"}, "format": triggered},
         f"{rf}.type", "json_schema"),
        # what only the worker's xgrammar judges, said of the field that held it
        (legacy(structures=[{**tag, "schema": {"type": "nope"}}]), f"{rf}.structures",
         "cannot compile"),
        ({"type": "structural_tag", "format": {"type": "bogus"}}, f"{rf}.format",
         "cannot compile"),
    ]  # fmt: skip
    for fmt, param, words in cases:
        _assert_400(lambda f=fmt: _chat(client, False, response_format=f), param, words)
    so = {"structured_outputs": {"structural_tag": json.dumps(legacy(triggers=["<g"]))}}
    _assert_400(
        lambda: _completion(client, True, extra_body=so),
        "structured_outputs.structural_tag.triggers.0", "prefix of some begin",
    )  # fmt: skip
    backend = {"guided_decoding_backend": "xgrammar", "guided_choice": CHOICES}
    _assert_400(
        lambda: _chat(client, False, extra_body=backend), "guided_decoding_backend",
        "chosen per server", "--structured-outputs-backend",
    )  # fmt: skip


def test_combinations_that_may_leave_no_token_are_refused(router, workers):
    """min_tokens past a finished choice, or allowed ids the grammar never allows, would leave
    nothing to sample (the engine fails the step): refused, over HTTP and gRPC."""
    client = _client(router)
    for extra, param in [
        ({"guided_choice": ["yes"], "min_tokens": 5}, "min_tokens"),
        ({"response_format": {"type": "json_object"}, "allowed_token_ids": [5, 6]},
         "allowed_token_ids"),
    ]:  # fmt: skip
        _assert_400(lambda e=extra: _completion(client, False, extra_body=e), param)
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.grpc_address))
    so = common_pb2.StructuredOutputs(choice=common_pb2.Choices(values=["yes"]))
    params = common_pb2.SamplingParams(max_tokens=8, min_tokens=5, structured_outputs=so)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(router_pb2.GenerateRequest(text="Hi", params=params)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_tokens" in info.value.details()
    assert_all_free(workers[1], NUM_BLOCKS)


def test_grpc_carries_the_constraint_and_names_a_bad_one(router):
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.grpc_address))
    so = common_pb2.StructuredOutputs(choice=common_pb2.Choices(values=CHOICES))
    params = common_pb2.SamplingParams(temperature=1.0, max_tokens=20, structured_outputs=so)
    for seed in range(3):
        params.seed = seed
        replies = list(stub.Generate(router_pb2.GenerateRequest(text="Hi", params=params)))
        assert "".join(r.text for r in replies) in CHOICES
        assert replies[-1].finish_reason == "stop"
    params.structured_outputs.CopyFrom(common_pb2.StructuredOutputs(regex="(unclosed"))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(router_pb2.GenerateRequest(text="Hi", params=params)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structured_outputs.regex" in info.value.details()
    params.structured_outputs.CopyFrom(common_pb2.StructuredOutputs(json="{not json"))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(router_pb2.GenerateRequest(text="Hi", params=params)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structured_outputs.json" in info.value.details()
