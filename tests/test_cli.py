"""The `baton` command line: help, argument errors, and generate's use of the engine API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher import cli

ROOT = Path(__file__).resolve().parents[1]


def run_baton(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m launcher ARGS` from the repository root, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )


def test_help_lists_the_subcommands() -> None:
    result = run_baton("--help")
    assert result.returncode == 0, result.stderr
    for command in ("generate", "make-tiny-model", "demo-model"):
        assert command in result.stdout


def test_generate_with_a_missing_model_dir_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = run_baton("generate", "--model", str(missing), "hello")
    assert result.returncode == 2
    assert "error:" in result.stderr
    assert str(missing) in result.stderr


def test_parse_bytes_accepts_units() -> None:
    assert cli.parse_bytes("4096") == 4096
    assert cli.parse_bytes("512MiB") == 512 * 2**20
    assert cli.parse_bytes("2G") == 2 * 10**9
    assert cli.parse_bytes("1.5GiB") == 3 * 2**29
    with pytest.raises(Exception, match="not a byte count"):
        cli.parse_bytes("lots")


def _greedy_text(model: Path, prompt: str, chat: bool, max_tokens: int) -> str:
    from engine import LLM, SamplingParams

    llm = LLM(str(model))
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    if chat:
        out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)
    else:
        out = llm.generate([prompt], params, use_tqdm=False)
    return out[0].outputs[0].text


def test_generate_streams_the_engines_chat_answer(
    tiny_model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model("qwen2")
    status = cli.main([
        "generate", "--model", str(model), "--max-tokens", "7", "--max-num-seqs", "4",
        "--kv-cache-memory-bytes", "64MiB", "What?",
    ])
    assert status == 0
    assert capsys.readouterr().out == _greedy_text(model, "What?", chat=True, max_tokens=7) + "\n"


def test_generate_without_chat_sends_raw_text(
    tiny_model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model("llama")
    assert cli.main(["generate", "--model", str(model), "--no-chat", "--max-tokens", "5",
                     "Once upon"]) == 0
    expected = _greedy_text(model, "Once upon", chat=False, max_tokens=5)
    assert capsys.readouterr().out == expected + "\n"


def test_generate_reports_engine_value_errors(
    tiny_model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_model("llama")
    status = cli.main(["generate", "--model", str(model), "--temperature", "-1", "Hi"])
    assert status == 2
    assert "error: temperature must be >= 0" in capsys.readouterr().err


def test_demo_model_prints_its_directory(
    demo_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["demo-model"]) == 0
    assert capsys.readouterr().out.strip() == str(demo_model_dir)


def test_make_tiny_model_writes_a_model_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "tiny"
    assert cli.main(["make-tiny-model", str(target), "--arch", "qwen2", "--seed", "1"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert (printed / "config.json").is_file()
    assert json.loads((printed / "config.json").read_text())["model_type"] == "qwen2"


@pytest.mark.needs_engine
@pytest.mark.slow
def test_generate_on_the_demo_model_answers_paris(demo_model_dir: Path) -> None:
    """End to end: the real engine, the demo model, greedy decoding, streamed to stdout."""
    result = run_baton("generate", "--max-tokens", "32", "What is the capital of France?",
                       timeout=300.0)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.endswith("\n")


def test_serve_refuses_a_gpu_kv_transport_without_gpus(
    tiny_model: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a machine without GPUs, `--kv-transport cuda-ipc` exits 2 before starting workers."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = tiny_model("llama")
    assert cli.main(["serve", "--model", str(model), "--kv-transport", "cuda-ipc"]) == 2
    assert "kv_transport 'cuda-ipc' needs GPU workers" in capsys.readouterr().err
