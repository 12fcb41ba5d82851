"""The `baton` command line: help, argument errors, and generate's use of the engine API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from launcher import cli
from worker_common.engine_args import parse_bytes

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
    assert parse_bytes("4096") == 4096
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2G") == 2 * 10**9
    assert parse_bytes("1.5GiB") == 3 * 2**29
    with pytest.raises(Exception, match="not a byte count"):
        parse_bytes("lots")


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


# --- baton serve: flags, --config, the API key -------------------------------------------------


def _model_dir(tmp_path: Path) -> Path:
    """A directory `resolve_model_dir` accepts (only config.json is looked for)."""
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _flags(words: list[str]) -> dict[str, str | None]:
    """`--name value` and bare `--name` words as {name: value or None}."""
    flags: dict[str, str | None] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            flags[word] = None if following.startswith("--") else following
    return flags


def test_serve_takes_flags_from_a_config_file_and_the_command_line_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.serve import cluster_spec

    monkeypatch.delenv("BATON_API_KEY", raising=False)
    config = tmp_path / "baton.yaml"
    config.write_text(
        f"model: {_model_dir(tmp_path)}\nmax-model-len: 512\nblock_size: 8\ndtype: float16\n"
        "enable_prefix_caching: false\nenforce-eager: true\nscheduling_policy: priority\n"
        "served_model_name: from-file\nchat_template: '{{ messages }}'\nkv_transport: tcp\n"
        "api_key: file-key\nport: 9100\n"
    )
    args = cli.parse_args(["serve", "--max-model-len", "256", "--config", str(config),
                           "--scheduling-policy", "fair", "--port", "9200"])  # fmt: skip
    spec = cluster_spec(args)
    assert _flags(spec.worker_args) == {
        "--served-model-name": "from-file", "--dtype": "float16", "--max-model-len": "256",
        "--enforce-eager": None, "--block-size": "8", "--no-enable-prefix-caching": None,
        "--scheduling-policy": "fair",
    }  # fmt: skip
    assert _flags(spec.router_args) == {
        "--served-model-name": "from-file", "--max-model-len": "256",
        "--chat-template": "{{ messages }}",
    }  # fmt: skip
    assert (spec.port, spec.kv_transport, spec.api_key) == (9200, "tcp", "file-key")


def test_serve_config_file_errors_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "baton.yaml"
    for text, message in [
        ("max_model_length: 512\n", "unknown key 'max_model_length'"),
        ("no_enable_prefix_caching: true\n", "write enable-prefix-caching: false"),
        ("enforce_eager: sometimes\n", "enforce_eager: expected true or false"),
        ("- a list\n", "expected a mapping"),
    ]:
        config.write_text(text)
        assert cli.main(["serve", "--config", str(config)]) == 2
        err = capsys.readouterr().err
        assert f"baton serve: error: --config {config}: " in err and message in err, err
    config.write_text("max_num_seqs: many\n")  # typed by argparse, as on the command line
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", "--config", str(config)])
    assert exit_info.value.code == 2
    assert "argument --max-num-seqs: invalid int value: 'many'" in capsys.readouterr().err


def test_serve_api_key_from_the_environment_unless_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.serve import cluster_spec

    model = ["serve", "--model", str(_model_dir(tmp_path))]
    monkeypatch.setenv("BATON_API_KEY", "env-key")
    assert cluster_spec(cli.parse_args(model)).api_key == "env-key"
    assert cluster_spec(cli.parse_args([*model, "--api-key", "flag-key"])).api_key == "flag-key"
    monkeypatch.delenv("BATON_API_KEY")
    assert cluster_spec(cli.parse_args(model)).api_key == ""


def test_serve_refuses_a_chat_template_path_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "template.jinja"
    status = cli.main(["serve", "--model", str(_model_dir(tmp_path)), "--chat-template",
                       str(missing)])  # fmt: skip
    assert status == 2
    assert "looks like a file path" in capsys.readouterr().err


def test_generate_takes_the_same_engine_flags() -> None:
    from worker_common.engine_args import engine_kwargs

    args = cli.parse_args(["generate", "--dtype", "float16", "--max-model-len", "128",
                           "--seed", "3", "--block-size", "8", "--no-enable-prefix-caching",
                           "--scheduling-policy", "priority", "--gpu-memory-utilization",
                           "0.5", "--enforce-eager", "--max-num-seqs", "2", "hi"])  # fmt: skip
    assert engine_kwargs(args) == {
        "dtype": "float16", "max_model_len": 128, "seed": 3, "enforce_eager": True,
        "block_size": 8, "gpu_memory_utilization": 0.5, "kv_cache_memory_bytes": None,
        "num_kv_blocks": None, "enable_prefix_caching": False, "max_num_seqs": 2,
        "max_num_batched_tokens": 2048, "max_num_waiting": None,
        "scheduling_policy": "priority", "async_scheduling": None,
        "kernel_backend": "auto", "fuse_gate_up": True, "fold_norms": True, "pdl": True,
        "structured_outputs_backend": "auto", "structured_outputs_disable_fallback": False,
        "structured_outputs_compile_timeout": 30.0, "structured_outputs_config": None,
        "speculative_config": None,
    }  # fmt: skip
