"""StructuredOutputsParams validation, SamplingParams carrying it, the
bitmask's application, the backend registry and the compile cache (no model needed)."""

from __future__ import annotations

import pytest
import torch

from common.sampling_params import SamplingParams
from common.structured_outputs import StructuredOutputsParams
from engine.structured.bitmask import allocate_bitmask, apply_token_bitmask, bitmask_width
from engine.structured.guidance_backend import without_additional_properties
from engine.structured.registry import backend_factory, backend_names, register_backend
from engine.structured.xgrammar_backend import bounded_strings_as_patterns, unsupported_keywords


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of .* got none"),
        ({"regex": "a", "choice": ["a"]}, "exactly one of .* got regex, choice"),
        ({"json_object": False}, "got none"),
        ({"json": "{not json"}, r"structured_outputs\.json is not valid JSON"),
        ({"json": "[1, 2]"}, r"structured_outputs\.json must be a JSON object"),
        ({"json": 3}, r"structured_outputs\.json must be a dict"),
        ({"regex": ""}, r"structured_outputs\.regex must be a non-empty string"),
        ({"choice": "ab"}, r"structured_outputs\.choice must be a list of strings"),
        ({"choice": []}, r"structured_outputs\.choice must not be empty"),
        ({"choice": ["a", 1]}, r"structured_outputs\.choice must be a list of strings"),
        ({"json_object": 1}, r"structured_outputs\.json_object must be a bool"),
        ({"regex": "a", "disable_any_whitespace": "yes"}, "disable_any_whitespace must be a bool"),
        ({"regex": "a", "disable_any_whitespace": True}, "applies to json and json_object only"),
        ({"choice": ["a"], "whitespace_pattern": " "}, "whitespace_pattern applies to json"),
        ({"structural_tag": "nope"}, r"structured_outputs\.structural_tag is not valid JSON"),
    ],
)
def test_invalid_params_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_kind_and_cache_key():
    a = StructuredOutputsParams(json={"type": "object", "b": 1})
    b = StructuredOutputsParams(json='{"b": 1, "type": "object"}')
    assert a.kind == b.kind == "json"
    assert a.cache_key() == b.cache_key()  # same schema, key order aside
    assert (
        a.cache_key()
        != StructuredOutputsParams(json=a.json, disable_any_whitespace=True).cache_key()
    )
    assert StructuredOutputsParams(json_object=True).kind == "json_object"
    assert StructuredOutputsParams(choice=["x"]).spec_text() == '["x"]'


def test_sampling_params_carry_it():
    so = StructuredOutputsParams(regex="[0-9]+")
    params = SamplingParams(temperature=0, structured_outputs=so)
    assert params == SamplingParams(
        temperature=0, structured_outputs=StructuredOutputsParams(regex="[0-9]+")
    )
    assert params != SamplingParams(temperature=0)
    assert SamplingParams().structured_outputs is None
    assert params.clone() == params
    from_dict = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert from_dict.structured_outputs == StructuredOutputsParams(choice=["a", "b"])
    with pytest.raises(ValueError, match="structured_outputs: .*unexpected keyword"):
        SamplingParams(structured_outputs={"bogus": 1})
    with pytest.raises(ValueError, match="structured_outputs must be a StructuredOutputsParams"):
        SamplingParams(structured_outputs="json")  # type: ignore[arg-type]


def test_engine_exports_it():
    import engine

    assert engine.StructuredOutputsParams is StructuredOutputsParams


def _reference_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    for j, i in enumerate(rows):
        for t in range(logits.shape[1]):
            word, bit = divmod(t, 32)
            if not (int(bitmask[j, word]) >> bit) & 1:
                out[i, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [32, 70, 96])
def test_apply_token_bitmask_matches_the_bits(vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=gen)
    bitmask = allocate_bitmask(4, vocab)  # a row per logits row; only `rows` are applied
    assert bitmask.shape == (4, bitmask_width(vocab)) and bool((bitmask == -1).all())
    bitmask.copy_(
        torch.randint(-(2**31), 2**31 - 1, bitmask.shape, generator=gen, dtype=torch.int64).to(
            torch.int32
        )
    )
    bitmask[3, 0] = -(2**31)  # only bit 31 of the first word: token 31 allowed
    rows = [3, 1]
    expected = _reference_mask(logits, bitmask[rows], rows)
    apply_token_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)
    assert logits[3, 31].isfinite() and not logits[3, :31].isfinite().any()


def test_schema_rewrites():
    schema = {
        "type": "object",
        "properties": {
            "enum": {"type": "string", "maxLength": 4},
            "p": {"type": "string", "maxLength": 4, "pattern": "^a+$"},
            "inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
        },
        "enum": [{"type": "string", "maxLength": 1}],
    }
    rewritten = bounded_strings_as_patterns(schema)
    assert rewritten["properties"]["enum"] == {
        "type": "string",
        "pattern": "^[ !#-\\[\\]-\\U0010ffff]{0,4}$",
    }
    assert rewritten["properties"]["p"] == schema["properties"]["p"]  # its own pattern kept
    assert rewritten["enum"] == schema["enum"]  # values, not schemas
    closed = without_additional_properties(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["inner"]["additionalProperties"] is False
    assert unsupported_keywords({"properties": {"not": {"multipleOf": 2}}}) == {"multipleOf"}


def test_registry():
    assert {"xgrammar", "guidance", "auto"} <= set(backend_names())
    with pytest.raises(ValueError, match="backend 'nope' is unknown; known: xgrammar, guidance"):
        backend_factory("nope")
    with pytest.raises(ValueError, match="'auto' is the fallback rule"):
        register_backend("auto", lambda tokenizer: None)  # type: ignore[arg-type,return-value]


def test_request_grammar_follows_rollback_and_replay(tiny_model):
    """The matcher follows the request's tokens: a fresh one replays them all (a hand-off or
    a restart), one ahead of them rolls back; either way the next mask is the same."""
    from concurrent.futures import Future

    from common.tokenizer import load_tokenizer
    from engine.structured.backend import TokenizerData
    from engine.structured.matcher_state import RequestGrammar
    from engine.structured.xgrammar_backend import XgrammarBackend

    path = tiny_model("qwen2")
    tokenizer = load_tokenizer(path)
    data = TokenizerData(tokenizer, vocab_size=len(tokenizer), eos_token_ids=(2,))
    grammar = XgrammarBackend(data).compile(StructuredOutputsParams(regex="ab{1,5}c"))
    done: Future = Future()
    done.set_result(grammar)
    tokens = [tokenizer.convert_tokens_to_ids(c) for c in "abbb"]

    def mask(state: RequestGrammar, output: list[int]) -> torch.Tensor:
        bitmask = allocate_bitmask(1, len(tokenizer))
        state.fill_bitmask(output, (2,), bitmask, 0)
        return bitmask

    ahead = RequestGrammar(done)
    mask(ahead, tokens)  # accepted all four
    rolled_back = mask(ahead, tokens[:2])
    assert torch.equal(rolled_back, mask(RequestGrammar(done), tokens[:2]))
    assert not torch.equal(rolled_back, mask(RequestGrammar(done), tokens[:1]))
    with pytest.raises(RuntimeError, match="the grammar refused token"):
        mask(RequestGrammar(done), [tokenizer.convert_tokens_to_ids("c")])
