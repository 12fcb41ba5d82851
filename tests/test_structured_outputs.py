"""Structured outputs through the offline API on a random-weight tiny model (it knows nothing of
JSON, so every valid output is the grammar's doing): JSON schemas, regex, choice, grammars,
json_object, the auto fallback, refusals, n > 1, stop strings, logprobs, preemption."""

from __future__ import annotations

import ast
import json
import math
import re
import threading

import jsonschema
import pytest

from engine import LLM, SamplingParams, StructuredOutputsParams
from engine.structured.backend import GrammarCompileError

BACKENDS = ["xgrammar", "guidance", "outlines", "lm-format-enforcer"]
REGULAR_ONLY = ("outlines", "lm-format-enforcer")  # no grammars: refused (below)
MAX_TOKENS = 200
SAMPLES = 6  # completions per spec at temperature 1

INT = {"type": "integer", "minimum": -20, "maximum": 20}
POINT = {
    "type": "object",
    "properties": {"x": INT, "y": INT},
    "required": ["x", "y"],
    "additionalProperties": False,
}
SCHEMAS = {
    "nested_object": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "name": {"type": "string", "maxLength": 6},
                },
                "required": ["id", "name"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "bounded_array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": INT, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "enum": {"type": "string", "enum": ["red", "green", "blue"]},
    "any_of": {"anyOf": [INT, {"type": "boolean"}, {"type": "null"}]},
    "ref_defs": {
        "$defs": {"point": POINT},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "integer_range": {"type": "integer", "minimum": 100, "maximum": 120},
    "string_pattern": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "a": {"type": "boolean"},
            "b": INT,
            "c": {"type": "string", "minLength": 1, "maxLength": 3},
        },
        "required": ["a"],
        "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": POINT, "minItems": 2, "maxItems": 3},
}
# Every backend takes every schema above: outlines and lm-format-enforcer enforce no integer
# bounds, and take the bounded integers as enums of their values (engine.structured.json_schema).
# What each backend refuses, and why, is in REFUSALS below.


@pytest.fixture(scope="module", params=BACKENDS)
def llm(request, tiny_model) -> LLM:
    return LLM(
        str(tiny_model("qwen2")), num_kv_blocks=256, structured_outputs_backend=request.param
    )


@pytest.fixture(scope="module")
def auto_llm(tiny_model) -> LLM:
    return LLM(str(tiny_model("qwen2")), num_kv_blocks=256)


@pytest.fixture(autouse=True)
def _no_leaks(request):
    yield
    for name in ("llm", "auto_llm"):
        if name in request.fixturenames:
            request.getfixturevalue(name).check_integrity()


def _generate(llm: LLM, so: StructuredOutputsParams, temperature: float, num: int, **kw):
    kw.setdefault("max_tokens", MAX_TOKENS)
    params = [
        SamplingParams(
            temperature=temperature,
            seed=None if temperature == 0 else i,
            structured_outputs=so,
            **kw,
        )
        for i in range(num)
    ]
    outputs = llm.generate([[11, 12, 13 + i] for i in range(num)], params, use_tqdm=False)
    return [c for out in outputs for c in out.outputs]


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(llm, name):
    schema = SCHEMAS[name]
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    for temperature, num in ((0.0, 1), (1.0, SAMPLES)):
        for completion in _generate(llm, so, temperature, num):
            assert completion.finish_reason == "stop", completion.text
            jsonschema.validate(json.loads(completion.text), schema)  # strict: no raw controls


def test_json_schema_as_string_with_whitespace(llm):
    schema = SCHEMAS["integer_range"]
    so = StructuredOutputsParams(json=json.dumps(schema))
    for completion in _generate(llm, so, 1.0, 4):
        jsonschema.validate(json.loads(completion.text), schema)


def test_regex_full_match(llm):
    pattern = r"[a-c]{2,5}-[0-9]{1,3}(\.[xy])?"
    so = StructuredOutputsParams(regex=pattern)
    for temperature, num in ((0.0, 1), (1.0, SAMPLES)):
        for completion in _generate(llm, so, temperature, num):
            assert completion.finish_reason == "stop"
            assert re.fullmatch(pattern, completion.text), completion.text


def test_choice_is_exact(llm):
    choices = ["positive", "negative", "neutral {x}", 'say "hi"']
    so = StructuredOutputsParams(choice=choices)
    texts = [c.text for c in _generate(llm, so, 1.0, 12)]
    assert set(texts) <= set(choices)
    assert _generate(llm, so, 0.0, 1)[0].text in choices


def test_ebnf_grammar_outputs_parse(llm):
    grammar = 'root ::= num (op num){0,3}\nop ::= "+" | "*"\nnum ::= [1-9] [0-9]{0,2}'
    so = StructuredOutputsParams(grammar=grammar)
    backend = llm.engine.config.structured_outputs.backend
    if backend in REGULAR_ONLY:
        with pytest.raises(
            ValueError, match=rf"structured_outputs\.grammar: the {backend} backend"
        ):
            _generate(llm, so, 1.0, 1)
        return
    for completion in _generate(llm, so, 1.0, SAMPLES):
        assert completion.finish_reason == "stop"
        tree = ast.parse(completion.text, mode="eval")  # an arithmetic expression
        assert all(isinstance(n.value, int) for n in ast.walk(tree) if isinstance(n, ast.Constant))
        assert re.fullmatch(r"[1-9][0-9]{0,2}([+*][1-9][0-9]{0,2}){0,3}", completion.text)


def test_json_object_is_an_object(llm):
    """Any JSON object is unbounded: a random model does not always close it in `limit` tokens;
    the ones that end (a good part of them) are objects, the rest ran to the limit."""
    so = StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
    limit = 400
    completions = _generate(llm, so, 1.0, 12, max_tokens=limit)
    finished = [c for c in completions if c.finish_reason == "stop"]
    assert len(finished) >= 4
    for completion in finished:
        assert isinstance(json.loads(completion.text), dict)
    for completion in completions:
        if completion.finish_reason != "stop":
            assert len(completion.token_ids) == limit
            assert completion.text.startswith("{")


@pytest.mark.parametrize("backend", ["guidance", "outlines"])
def test_whitespace_pattern_is_the_only_whitespace(tiny_model, backend):
    """Tabs only between the JSON's tokens (and some there: the pattern is what is used)."""
    llm = LLM(str(tiny_model("qwen2")), num_kv_blocks=64, structured_outputs_backend=backend)
    so = StructuredOutputsParams(json=POINT, whitespace_pattern=r"[\t]{0,2}")
    texts = [c.text for c in _generate(llm, so, 1.0, SAMPLES)]
    for text in texts:
        jsonschema.validate(json.loads(text), POINT)
        assert re.fullmatch(r'[{}":,xy0-9\t-]+', text), text
    assert any("\t" in text for text in texts)
    llm.check_integrity()


def test_n_greater_than_one(llm):
    schema = SCHEMAS["ref_defs"]
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    params = SamplingParams(temperature=1.0, n=5, max_tokens=MAX_TOKENS, structured_outputs=so)
    (out,) = llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert len(out.outputs) == 5
    for completion in out.outputs:
        jsonschema.validate(json.loads(completion.text), schema)


def test_stop_string_at_the_end_of_the_object(llm):
    """A stop string the grammar emits only as its last character leaves valid JSON."""
    schema = {
        "type": "object",
        "properties": {"a": INT, "b": {"type": "boolean"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    completions = _generate(llm, so, 1.0, 4, stop=["}"], include_stop_str_in_output=True)
    for completion in completions:
        assert completion.stop_reason == "}"
        jsonschema.validate(json.loads(completion.text), schema)


def test_logprobs_are_of_the_masked_distribution(llm):
    """Every token with a finite logprob is one the grammar allowed there (digits, or EOS once
    four digits are out); the allowed tokens' probabilities sum to at most 1."""
    so = StructuredOutputsParams(regex="[0-9]{4}")
    tokenizer = llm.get_tokenizer()
    eos = set(llm.engine.config.model.eos_token_ids)
    for completion in _generate(llm, so, 1.0, 4, logprobs=5):
        assert completion.logprobs is not None
        assert len(completion.logprobs) == len(completion.token_ids)
        masked = 0
        for token, position in zip(completion.token_ids, completion.logprobs, strict=True):
            assert math.isfinite(position[token].logprob)
            for tid, entry in position.items():
                if not math.isfinite(entry.logprob):
                    masked += 1
                    continue
                assert tid in eos or tokenizer.decode([tid]).isdigit(), tid
            assert sum(math.exp(e.logprob) for e in position.values()) <= 1.0 + 1e-4
        assert completion.token_ids[-1] in eos
        assert masked > 0  # the last step allows EOS alone: its other top entries are -inf


def test_greedy_is_deterministic(llm):
    so = StructuredOutputsParams(json=SCHEMAS["nested_object"], disable_any_whitespace=True)
    first = _generate(llm, so, 0.0, 1)[0].token_ids
    assert _generate(llm, so, 0.0, 1)[0].token_ids == first


def test_compiled_grammars_are_cached(llm):
    so = StructuredOutputsParams(regex="[a-z]{3}")
    stats = llm.engine.core.structured.compiler.stats
    _generate(llm, so, 1.0, 2)
    hits = stats.hits
    _generate(llm, so, 1.0, 2)
    assert stats.hits == hits + 2


def test_mixed_batch_with_plain_requests(llm):
    so = StructuredOutputsParams(choice=["alpha", "beta"])
    params = [
        SamplingParams(temperature=1.0, seed=1, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=2, max_tokens=MAX_TOKENS, structured_outputs=so),
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
    ]
    outs = llm.generate([[1, 2, 3], [4, 5, 6], [7, 8, 9]], params, use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 8
    assert outs[1].outputs[0].text in ("alpha", "beta")
    plain = llm.generate([[1, 2, 3]], params[0], use_tqdm=False)[0].outputs[0]
    assert plain.token_ids == outs[0].outputs[0].token_ids  # the mask left other rows alone


# -- auto fallback and refusals -------------------------------------------------------------

# xgrammar's regex parser has no group modifier flags; llguidance's (Rust regex) has.
CASE_INSENSITIVE = "(?i)ab{1,3}c"
# multipleOf is among the keywords xgrammar would not enforce (UNSUPPORTED_JSON_KEYWORDS).
MULTIPLE_OF = {"type": "integer", "minimum": 0, "maximum": 100, "multipleOf": 7}
LARK = 'start: NUM "+" NUM\nNUM: /[1-9][0-9]{0,2}/'


def test_auto_falls_back_to_guidance(auto_llm):
    backends = auto_llm.engine.core.structured.compiler.backends
    cases = [
        (
            StructuredOutputsParams(regex=CASE_INSENSITIVE),
            lambda t: re.fullmatch(CASE_INSENSITIVE, t),
        ),
        (
            StructuredOutputsParams(json=MULTIPLE_OF),
            lambda t: jsonschema.validate(json.loads(t), MULTIPLE_OF) or True,
        ),
        (
            StructuredOutputsParams(grammar=LARK),
            lambda t: re.fullmatch(r"[1-9][0-9]{0,2}\+[1-9][0-9]{0,2}", t),
        ),
    ]
    for so, check in cases:
        with pytest.raises(ValueError, match="xgrammar"):
            backends.get("xgrammar").compile(so)
        assert backends.compile("auto", so).backend == "guidance"
        for completion in _generate(auto_llm, so, 1.0, 4):
            assert completion.finish_reason == "stop"
            assert check(completion.text), completion.text
    plain = StructuredOutputsParams(regex="[a-z]{2}")
    assert backends.compile("auto", plain).backend == "xgrammar"


@pytest.mark.parametrize(
    ("backend", "so", "field"),
    [
        ("xgrammar", StructuredOutputsParams(regex=CASE_INSENSITIVE), "structured_outputs.regex"),
        ("xgrammar", StructuredOutputsParams(json=MULTIPLE_OF), "structured_outputs.json"),
        ("xgrammar", StructuredOutputsParams(grammar=LARK), "structured_outputs.grammar"),
        (
            "guidance",
            StructuredOutputsParams(json={"not": {"type": "string"}}),
            "structured_outputs.json",
        ),
        (
            "guidance",
            StructuredOutputsParams(structural_tag={"type": "structural_tag"}),
            "structured_outputs.structural_tag",
        ),
        ("outlines", StructuredOutputsParams(grammar=LARK), "structured_outputs.grammar"),
        (
            "lm-format-enforcer",
            StructuredOutputsParams(json={"type": "number"}),
            "structured_outputs.json",
        ),
    ],
)
def test_explicit_backend_never_falls_back(tiny_model, backend, so, field):
    llm = LLM(str(tiny_model("qwen2")), num_kv_blocks=64, structured_outputs_backend=backend)
    params = SamplingParams(max_tokens=MAX_TOKENS, structured_outputs=so)
    with pytest.raises(ValueError, match=re.escape(f"{field}: the {backend} backend")):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    llm.check_integrity()
    assert not llm.engine.core.scheduler.requests
    ok = SamplingParams(
        max_tokens=MAX_TOKENS, structured_outputs=StructuredOutputsParams(choice=["ok"])
    )
    assert llm.generate([[1, 2, 3]], ok, use_tqdm=False)[0].outputs[0].text == "ok"


def test_auto_tries_outlines_last(auto_llm):
    """A spec no backend takes: `auto` tried outlines after guidance, and says why each refused.

    No spec was found that outlines serves and both xgrammar and guidance refuse (so that
    `auto` would pick outlines): llguidance parses regexes with the same Rust regex-syntax
    crate as outlines-core, and took every schema outlines takes (48 regexes and 24 schemas
    tried: anchors, Unicode classes, lookaround, lazy and possessive repeats, formats, ...)."""
    so = StructuredOutputsParams(regex=r"\bword\b")  # word boundaries: no backend has them
    with pytest.raises(
        ValueError, match=r"no backend takes it \(xgrammar: .*guidance: .*outlines: "
    ):
        auto_llm.engine.core.structured.compiler.backends.compile("auto", so)


NOT = {"not": {"type": "string"}}
# (backend, spec, the reason's words): what the regular-language backends refuse, and why.
REFUSALS = [
    ("outlines", StructuredOutputsParams(grammar='root ::= "a"'), "regular languages only"),
    ("outlines", StructuredOutputsParams(structural_tag={"type": "x"}), "xgrammar backend only"),
    ("outlines", StructuredOutputsParams(json=NOT), r"unsupported keywords \['not'\]"),
    (  # one bound: no enum to take its place, and outlines-core ignores minimum
        "outlines",
        StructuredOutputsParams(json={"type": "integer", "minimum": 0}),
        r"unsupported keywords \['minimum'\]",
    ),
    (  # outlines-core compiles oneOf as anyOf: a value matching two branches would pass
        "outlines",
        StructuredOutputsParams(json={"oneOf": [{"type": "string"}, {"type": "null"}]}),
        r"unsupported keywords \['oneOf'\]",
    ),
    (  # outlines-core reads `properties` and passes over `anyOf` beside it
        "outlines",
        StructuredOutputsParams(json={**POINT, "anyOf": [{"required": ["x"]}]}),
        "anyOf beside properties",
    ),
    (  # it takes maxLength and passes over the pattern
        "outlines",
        StructuredOutputsParams(json={"type": "string", "pattern": "^a+$", "maxLength": 3}),
        "pattern or format beside minLength/maxLength",
    ),
    (  # it unrolls recursion three levels and drops what lies deeper, required or not
        "outlines",
        StructuredOutputsParams(
            json={
                "$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#"}}}},
                "$ref": "#/$defs/node",
            }
        ),
        "a recursive \\$ref",
    ),
    ("outlines", StructuredOutputsParams(json={"enum": []}), "an empty enum"),
    (  # outlines-core puts a pattern in as it stands: `.` would take `"` and end the string
        "outlines",
        StructuredOutputsParams(json={"type": "string", "pattern": "^a.$"}),
        "a pattern that may match",
    ),
    ("lm-format-enforcer", StructuredOutputsParams(grammar='root ::= "a"'), "regular expressions"),
    (
        "lm-format-enforcer",
        StructuredOutputsParams(structural_tag={"type": "x"}),
        "xgrammar backend only",
    ),
    (  # its number parser takes 1.e5 (and 1e-5 as an integer)
        "lm-format-enforcer",
        StructuredOutputsParams(json={"type": "number"}),
        "integers and numbers, but for ranges of up to 1024 integers",
    ),
    (
        "lm-format-enforcer",
        StructuredOutputsParams(json={"type": "integer", "minimum": 0, "maximum": 5000}),
        r"unsupported keywords \['maximum', 'minimum'\]",
    ),
    (  # it has no formats: a date would be any string
        "lm-format-enforcer",
        StructuredOutputsParams(json={"type": "string", "format": "date"}),
        r"unsupported keywords \['format'\]",
    ),
    (  # it would fail on these mid-generation
        "lm-format-enforcer",
        StructuredOutputsParams(json={"type": "string", "pattern": "^a+$", "maxLength": 3}),
        "pattern beside minLength/maxLength",
    ),
    ("lm-format-enforcer", StructuredOutputsParams(json={"const": 5}), "a const other than"),
    (
        "lm-format-enforcer",
        StructuredOutputsParams(json_object=True, whitespace_pattern="[ ]?"),
        "whitespace_pattern is not supported",
    ),
    *[
        (  # any object with no properties: refused rather than read as `{}` alone
            backend,
            StructuredOutputsParams(json_object=True, disable_additional_properties=True),
            "disable_additional_properties with json_object",
        )
        for backend in REGULAR_ONLY
    ],
    (
        "lm-format-enforcer",
        StructuredOutputsParams(json=SCHEMAS["enum"], whitespace_pattern="[ ]?"),
        "whitespace_pattern is not supported",
    ),
]


@pytest.mark.parametrize(("backend", "so", "why"), REFUSALS)
def test_backend_refusals_name_the_field_and_the_reason(auto_llm, backend, so, why):
    backends = auto_llm.engine.core.structured.compiler.backends
    field = f"structured_outputs.{so.kind}"
    with pytest.raises(GrammarCompileError, match=rf"{field}: the {backend} backend .*{why}"):
        backends.get(backend).compile(so)


def test_a_failed_compile_leaves_the_batch_running(auto_llm):
    engine = auto_llm.engine
    bad = StructuredOutputsParams(regex="(unclosed")
    engine.add_request("good", [1, 2, 3], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.add_request("bad", [1, 2, 3], SamplingParams(max_tokens=12, structured_outputs=bad))
    error, finished = None, []
    while engine.has_unfinished_requests():
        try:
            finished += [s.request_id for s in engine.step() if s.finished]
        except ValueError as e:
            error = e
    assert error is not None and "structured_outputs.regex" in str(error)
    assert finished == ["good"]
    engine.check_integrity(expect_all_free=True)


def test_a_grammar_that_leaves_no_token_ends_only_its_request(auto_llm):
    """A choice done before min_tokens (EOS held back, nothing else allowed): that request
    ends with an error naming structured_outputs; the plain request beside it completes."""
    engine = auto_llm.engine
    done = StructuredOutputsParams(choice=["yes"])
    params = SamplingParams(max_tokens=12, min_tokens=5, structured_outputs=done)
    engine.add_request("plain", [1, 2, 3], SamplingParams(max_tokens=12, ignore_eos=True))
    engine.add_request("stuck", [1, 2, 3], params)
    error, finished = None, {}
    while engine.has_unfinished_requests():
        try:
            finished.update({s.request_id: s for s in engine.step() if s.finished})
        except ValueError as e:
            error = e
    assert error is not None and "structured_outputs" in str(error)
    assert set(finished) == {"plain"}
    (plain,) = finished["plain"].completions.values()
    assert len(plain.token_ids) == 12 and plain.finish_reason == "length"
    engine.check_integrity(expect_all_free=True)


# -- compiling off the step, preemption -----------------------------------------------------


def test_a_compiling_request_waits_while_the_batch_runs_on(tiny_model, monkeypatch):
    from engine.request import RequestStatus
    from engine.structured import registry
    from engine.structured.backend import StructuredOutputBackend
    from engine.structured.xgrammar_backend import XgrammarBackend

    gate = threading.Event()

    class GatedBackend(StructuredOutputBackend):
        """xgrammar, once the test opens the gate: a compile as slow as the test wants."""

        name = "gated"

        def __init__(self, tokenizer):
            super().__init__(tokenizer)
            self.inner = XgrammarBackend(tokenizer)

        def compile(self, params):
            assert gate.wait(timeout=30)
            return self.inner.compile(params)

    monkeypatch.setitem(registry._BACKENDS, "gated", GatedBackend)
    llm = LLM(str(tiny_model("qwen2")), num_kv_blocks=64, structured_outputs_backend="gated")
    engine = llm.engine
    so = StructuredOutputsParams(choice=["left", "right"])
    engine.add_request("plain", [1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True))
    engine.add_request("json", [4, 5, 6], SamplingParams(max_tokens=50, structured_outputs=so))
    waiting = engine.core.scheduler.requests["json"]
    assert waiting.status == RequestStatus.WAITING_FOR_GRAMMAR
    done = {}
    while "plain" not in done:
        done.update({s.request_id: s for s in engine.step() if s.finished})
    assert waiting.status == RequestStatus.WAITING_FOR_GRAMMAR and not waiting.output_token_ids
    assert waiting.num_computed_tokens == 0  # never scheduled
    gate.set()
    while engine.has_unfinished_requests():
        done.update({s.request_id: s for s in engine.step() if s.finished})
    assert done["json"].to_output().outputs[0].text in ("left", "right")
    engine.check_integrity(expect_all_free=True)


def test_an_aborted_compiling_request_leaks_nothing(auto_llm):
    engine = auto_llm.engine
    so = StructuredOutputsParams(regex="[a-z]{1,4}x[0-9]{7}")  # a fresh spec: compiling
    engine.add_request("gone", [1, 2, 3], SamplingParams(max_tokens=20, structured_outputs=so))
    engine.abort_request(["gone"])
    assert not engine.has_unfinished_requests()
    assert not engine.core.scheduler.waiting_for_grammar
    engine.check_integrity(expect_all_free=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preemption_keeps_outputs_valid(tiny_model, backend):
    """A KV cache too small for the batch: requests are preempted and recomputed, and their
    matchers follow; greedy outputs equal those of a cache large enough."""
    schema = SCHEMAS["top_level_array"]
    so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
    prompts = [[20 + i] * 30 for i in range(8)]
    outputs = {}
    for blocks in (16, 256):
        llm = LLM(
            str(tiny_model("qwen2")), num_kv_blocks=blocks, structured_outputs_backend=backend
        )
        params = [
            SamplingParams(temperature=t, seed=i, max_tokens=MAX_TOKENS, structured_outputs=so)
            for i, t in enumerate([0.0, 1.0] * 4)
        ]
        outs = llm.generate(prompts, params, use_tqdm=False)
        for out in outs:
            jsonschema.validate(json.loads(out.outputs[0].text), schema)
        outputs[blocks] = [out.outputs[0].token_ids for out in outs]
        preemptions = llm.engine.core.scheduler.num_preemptions
        assert (preemptions > 0) == (blocks == 16)
        llm.check_integrity()
    assert outputs[16][::2] == outputs[256][::2]  # the greedy ones


def test_async_scheduling_chains_structured_greedy_steps(tiny_model):
    """Greedy structured requests are launched ahead like plain greedy ones (each step's masks
    filled once the previous step's tokens are read): with asynchronous scheduling on, steps
    chain and none is deferred, and the outputs are those of synchronous steps, through a
    schema, a regex, a choice and plain requests in one batch, with preemption (a small KV
    cache) and prompt chunking in the run."""
    schema = SCHEMAS["bounded_array"]
    specs = [
        StructuredOutputsParams(json=schema, disable_any_whitespace=True),
        StructuredOutputsParams(regex=r"[a-f]{3,9}-[0-9]{2}"),
        StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"]),
        None,
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=so)
        for so in specs for _ in range(3)
    ]  # fmt: skip
    prompts = [[11 + i, 12, 13] * (1 + i % 4) for i in range(len(params))]
    outputs = {}
    for mode in (False, True):
        llm = LLM(
            str(tiny_model("qwen2")), num_kv_blocks=32, block_size=4,
            max_num_batched_tokens=16, async_scheduling=mode,
        )  # fmt: skip
        assert llm.engine.core.async_scheduling == mode
        outs = llm.generate(prompts, params, use_tqdm=False)
        outputs[mode] = [o.outputs[0].token_ids for o in outs]
        for out in outs[:3]:
            jsonschema.validate(json.loads(out.outputs[0].text), schema)
        assert all(re.fullmatch(r"[a-f]{3,9}-[0-9]{2}", o.outputs[0].text) for o in outs[3:6])
        assert all(o.outputs[0].text in ("alpha", "beta", "gamma delta") for o in outs[6:9])
        core = llm.engine.core
        if mode:
            assert core.num_chained_steps > 0 and core.num_deferred_steps == 0
            assert core.scheduler.num_preemptions > 0
        llm.check_integrity()
    assert outputs[True] == outputs[False]
