"""common.tokenizer.load_tokenizer (torch-free) against transformers' AutoTokenizer: the same
tokens, text, special tokens and chat template wherever tokenizer.json says what AutoTokenizer's
class would build."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from transformers import AutoTokenizer

from common.tokenizer import load_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces\n\nnew\r\nlines\t tab",
    "Ünïcödé, café e\u0301 日本語 🎉 and $19.99 at 12:30",
    "it's I'll we've 1234567",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]
# Qwen2's pre-tokenizer: what transformers' Qwen2Tokenizer builds, and real Qwen2 checkpoints'
# tokenizer.json holds.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def assert_same_tokenizer(model_dir: Path) -> None:
    ours, reference = load_tokenizer(model_dir), AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        for special in (True, False):
            ids = reference.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
                    ids, skip_special_tokens=skip
                )
    messages = [{"role": "user", "content": "hello there"}]
    assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (
        reference.eos_token_id,
        reference.bos_token_id,
        reference.pad_token_id,
    )
    assert len(ours) == len(reference) and ours.all_special_ids == reference.all_special_ids


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_tiny_models_tokenize_as_auto_tokenizer(tiny_model, arch: str) -> None:
    assert_same_tokenizer(tiny_model(arch))


def test_a_qwen2_tokenizer_json_tokenizes_as_auto_tokenizer(tiny_model, tmp_path: Path) -> None:
    """For model type qwen2, AutoTokenizer builds Qwen2Tokenizer, which sets Qwen2's normalizer
    and pre-tokenizer whatever tokenizer.json says; with a tokenizer.json that holds them, as
    real Qwen2 checkpoints' do, the two agree."""
    model_dir = Path(shutil.copytree(tiny_model("qwen2"), tmp_path / "qwen2"))
    backend = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.save(str(model_dir / "tokenizer.json"))
    assert type(AutoTokenizer.from_pretrained(model_dir)).__name__ == "Qwen2Tokenizer"
    assert_same_tokenizer(model_dir)
