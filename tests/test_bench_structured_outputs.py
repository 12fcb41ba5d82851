"""bench.structured_outputs end to end on a tiny model (CPU), and the byte-level vocabulary its
GPU run gives the random 1B shape."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench.byte_level_tokenizer import byte_level_vocab, write_byte_level_tokenizer
from bench.structured_outputs import BATCH, constraint, main


def test_tiny_run(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "so.json"
    argv = ["--model", str(tiny_model("qwen2")), "--decode-steps", "4", "--repeats", "1"]
    threads = torch.get_num_threads()  # as it is: the default (1 on cpu) would stay set
    result = main([*argv, "--ttft-repeats", "2", "--threads", str(threads), "--out", str(out)])

    assert json.loads(out.read_text()) == result
    assert result["command"].startswith("python -m bench.structured_outputs --model")
    assert result["warm_up"]["backend"] == "xgrammar"
    for pair in result["per_token"].values():
        for kind in ("plain", "structured"):
            run = pair[kind]
            assert run["output_tokens"] == BATCH * 4 and run["decode_tokens"] == BATCH * 3
            assert run["ms_per_token"] > 0 and len(run["ms_per_token_samples"]) == 1
            assert run["cpu_ms_per_token"] > 0 and run["decode_cpu_seconds"] > 0
        assert pair["same_token_counts"] and pair["basis"] == "cpu_ms_per_token"
        assert pair["ratio"] == pair["cpu_ratio"] and pair["wall_ratio"] > 0
        assert pair["structured"]["sample_text"].startswith("[")  # the schema's array
        assert pair["structured"]["finished_json"] == 0  # 64 items: no answer ends
    ttft = result["ttft"]
    assert (ttft["cache_misses"], ttft["cache_hits"]) == (2, 2)  # cold misses, cached hits
    assert len(ttft["cold_ms_samples"]) == 2 and ttft["cold_ms"] > 0
    assert ttft["cold_cpu_ms"] > 0 and len(ttft["compile_ms_samples"]) == 2
    assert result["summary"]["aim_overhead_at_most"] == 0.10
    mask = result["mask_fill"]
    assert mask["document_tokens"] > 0 and mask["schema"]["mean_ms"] > 0
    assert mask["unbounded_strings"]["max_ms"] >= mask["unbounded_strings"]["median_ms"]


def test_renamed_property_is_another_schema() -> None:
    base, other = constraint(), constraint("x")
    assert base.cache_key() != other.cache_key()
    assert "id_x" in json.dumps(other.json) and '"id"' not in json.dumps(other.json)


def test_byte_level_vocabulary_spells_json(tmp_path: Path) -> None:
    """Every byte is a token, the size is exact, and xgrammar takes the vocabulary: a JSON
    document of the benchmark's schema, encoded, is accepted token by token."""
    from common.tokenizer import load_tokenizer
    from engine.structured.backend import TokenizerData
    from engine.structured.registry import Backends

    vocab = byte_level_vocab(3000)
    assert len(vocab) == 3000 and sorted(vocab.values()) == list(range(3000))
    assert vocab["</s>"] == 2 and '":Ġ' in vocab  # eos, and a JSON punctuation run
    write_byte_level_tokenizer(tmp_path, 3000)
    tokenizer = load_tokenizer(str(tmp_path))
    grammar = Backends(TokenizerData(tokenizer, 3000, (2,))).compile("xgrammar", constraint())
    text = '[{"name": "Ada", "age": 36, "city": "London", "id": 7}, {"name": "'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    matcher = grammar.matcher()
    assert all(matcher.accept_token(i) for i in ids)
