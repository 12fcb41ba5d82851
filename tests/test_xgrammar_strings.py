"""Length-bounded JSON strings under the xgrammar backend (engine.structured.xgrammar_strings):
the chain of rules holds exactly the JSON string characters (no control character, no invalid
UTF-8), counts characters not bytes, and leaves the mask's work to the compile-time cache."""

from __future__ import annotations

import json

import pytest
import torch

from common.structured_outputs import StructuredOutputsParams
from engine.structured.backend import TokenizerData
from engine.structured.bitmask import allocate_bitmask
from engine.structured.xgrammar_backend import XgrammarBackend
from engine.structured.xgrammar_strings import MAX_CHAIN_LENGTH, json_schema_as_ebnf

SCHEMA = {
    "type": "object",
    "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 4}},
    "required": ["s"],
    "additionalProperties": False,
}


def _byte_level_alphabet() -> dict[int, str]:
    """byte -> its character in GPT-2's byte-level alphabet (a token of the tiny tokenizer)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


@pytest.fixture(scope="module")
def string_grammar(tiny_model):
    """(compile a schema to a matcher factory, token id of a byte) over the tiny tokenizer."""
    from common.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_model("qwen2"))
    backend = XgrammarBackend(TokenizerData(tokenizer, len(tokenizer), (2,)))
    alphabet = _byte_level_alphabet()

    def byte_id(b: int) -> int:
        return tokenizer.convert_tokens_to_ids(alphabet[b])

    def compile_schema(schema):
        so = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        return backend.compile(so)

    return compile_schema, byte_id, len(tokenizer)


def _accepts(grammar, byte_id, text: bytes) -> bool:
    """Whether the grammar takes `text` one byte token at a time, to its end."""
    matcher = grammar.matcher()
    return all(matcher.accept_token(byte_id(b)) for b in text)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("中文字符".encode(), True),  # 4 characters of 3 bytes: the bound counts characters
        ("😀é中a".encode(), True),
        ("中文字符字".encode(), False),  # 5 characters
        (b"a", True),
        (b"", False),  # minLength 1
        (b"a\x01", False),  # raw control characters
        (b"\t", False),
        (b"a\\", False),  # escapes are not taken in bounded strings
        (b"\x80", False),  # a lone continuation byte
        (b"\xe4a", False),  # a lead byte without its continuation
        (b"\xe0\x80\x81", False),  # an overlong U+0001
        (b"\xed\xa0\x80", False),  # a surrogate
        (b"\xf4\x90\x80\x80", False),  # past U+10FFFF
    ],
)
def test_bounded_string_holds_json_characters_only(string_grammar, value, ok):
    compile_schema, byte_id, _ = string_grammar
    grammar = compile_schema(SCHEMA)
    assert _accepts(grammar, byte_id, b'{"s": "' + value + b'"}') is ok


def test_the_chain_is_compiled_and_shared():
    two = {"type": "array", "items": {"type": "string", "maxLength": 3}}
    ebnf = json_schema_as_ebnf({"type": "object", "properties": {"a": SCHEMA, "b": two}}, False)
    assert ebnf is not None and "baton-bounded-string" not in ebnf  # every marker swapped
    chain_rules = [line for line in ebnf.splitlines() if line.startswith("baton_string_")]
    # minLength 1 maxLength 4: need 1 left 4, then need 0 left 3..0; maxLength 3 shares those
    assert sorted(line.split()[0] for line in chain_rules) == [
        "baton_string_0_0", "baton_string_0_1", "baton_string_0_2", "baton_string_0_3",
        "baton_string_1_4",
    ]  # fmt: skip
    too_long = {"type": "string", "maxLength": MAX_CHAIN_LENGTH + 1}
    assert json_schema_as_ebnf(too_long, False) is None  # the pattern serves
    assert json_schema_as_ebnf({"type": "string", "maxLength": 4, "enum": ["a"]}, False) is None


def test_at_the_bound_only_the_closing_quote_is_allowed(string_grammar):
    compile_schema, byte_id, vocab_size = string_grammar
    matcher = compile_schema(SCHEMA).matcher()
    assert all(matcher.accept_token(byte_id(b)) for b in b'{"s": "abcd')
    bitmask = allocate_bitmask(1, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = set(bits.view(-1).nonzero().view(-1).tolist())
    assert byte_id(ord('"')) in allowed and byte_id(ord("e")) not in allowed


def test_long_bounds_keep_the_pattern(string_grammar):
    compile_schema, byte_id, _ = string_grammar
    schema = {"type": "string", "maxLength": MAX_CHAIN_LENGTH + 2}
    grammar = compile_schema(schema)

    def string(n: int) -> bytes:
        return json.dumps("é" * n, ensure_ascii=False).encode()

    assert _accepts(grammar, byte_id, string(MAX_CHAIN_LENGTH + 2))
    assert not _accepts(grammar, byte_id, string(MAX_CHAIN_LENGTH + 3))
    assert not _accepts(grammar, byte_id, b'"\x01"')


def _masks_along(grammar, byte_id, vocab_size: int, text: bytes) -> list[torch.Tensor]:
    """The allowed-token mask before each byte token of `text` (all of which must be taken)."""
    matcher, bitmask, masks = grammar.matcher(), allocate_bitmask(1, vocab_size), []
    for b in text:
        matcher.fill_bitmask(bitmask, 0)
        masks.append(bitmask.clone())
        assert matcher.accept_token(byte_id(b))
    return masks


def test_rules_compiled_before_give_the_same_masks(string_grammar, tiny_model):
    """A schema compiled after others that share its chain's rules (xgrammar's compiler reuses
    their token masks) masks every token as a backend that never saw them does."""
    from common.tokenizer import load_tokenizer

    compile_schema, byte_id, vocab_size = string_grammar
    pair = {"type": "object", "properties": {"a": SCHEMA["properties"]["s"], "b": {
        "type": "string", "maxLength": 6}}, "required": ["a", "b"]}  # fmt: skip
    compile_schema(SCHEMA)
    compile_schema({"type": "array", "items": {"type": "string", "maxLength": 5}})
    tokenizer = load_tokenizer(tiny_model("qwen2"))
    fresh = XgrammarBackend(TokenizerData(tokenizer, len(tokenizer), (2,)))
    so = StructuredOutputsParams(json=pair, disable_any_whitespace=True)
    text = '{"a": "中文", "b": "abcdef"}'.encode()
    reused = _masks_along(compile_schema(pair), byte_id, vocab_size, text)
    alone = _masks_along(fresh.compile(so), byte_id, vocab_size, text)
    assert all(torch.equal(x, y) for x, y in zip(reused, alone, strict=True))
