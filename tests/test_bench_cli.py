"""`baton bench` end to end on CPU: run (HTTP and gRPC), sweep and compare against clusters of
the tiny model started with `cluster.start_cluster`; the result JSON's fields and the PNG plots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster import ClusterSpec, free_port, start_cluster
from launcher import cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_LOAD = ["--num-requests", "4", "--concurrency", "2", "--no-progress", "--warmup", "1"]


@pytest.fixture(scope="module")
def cluster(tiny_model) -> Iterator[tuple[ClusterSpec, Path]]:
    """1 prefill + 1 decode worker and the router, on free ports."""
    model = tiny_model("qwen2")
    spec = ClusterSpec(model=model, prefill=1, decode=1, port=free_port(), grpc_port=free_port())
    running = start_cluster(spec)
    try:
        yield spec, model
    finally:
        running.stop()


def _bench(*argv: str) -> dict[str, Any]:
    out = Path(argv[argv.index("--out") + 1])
    assert cli.main(["bench", *argv]) == 0
    return json.loads((out / "result.json").read_text())


def _assert_pngs(out: Path, names: list[str], result: dict[str, Any]) -> None:
    assert result["plots"] == names
    for name in names:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def _assert_common_fields(result: dict[str, Any], mode: str, seed: int) -> None:
    assert result["benchmark"] == "baton bench" and result["mode"] == mode
    assert result["command"].startswith(f"baton bench {mode} ")
    assert f"--seed {seed}" in result["command"]
    assert result["seed"] == seed == result["workload"]["seed"]
    assert result["machine"]["cpu_count"] and result["machine"]["python"]
    for key in ("created_utc", "arrivals", "slo", "concurrency", "target"):
        assert key in result


def _assert_good_run(run: dict[str, Any], requests: int, output_len: int | None) -> None:
    summary = run["summary"]
    assert (summary["completed"], summary["failed"]) == (requests, 0), summary["errors"]
    assert summary["duration_s"] > 0 and summary["output_throughput"] > 0
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert summary[metric]["p50"] > 0 and summary[metric]["p99"] >= summary[metric]["p50"]
    assert len(run["requests"]) == requests
    for record in run["requests"]:
        assert record["success"] and record["ttft_s"] > 0 and record["e2e_s"] >= record["ttft_s"]
        assert record["prompt_tokens"] > 0 and record["cached_tokens"] >= 0
        if output_len is not None:
            assert record["output_tokens"] == output_len
            assert record["tpot_s"] > 0
        # pieces that decode to no text (likely from a random-weight model) are not timed
        assert len(record["itl_s"]) <= record["output_tokens"] - 1


def test_run_over_http(cluster, tmp_path: Path) -> None:
    spec, model = cluster
    out = tmp_path / "http"
    result = _bench(
        "run", "--url", f"http://{spec.host}:{spec.port}", "--model", str(model),
        "--workload", "fixed", "--input-len", "24", "--output-len", "6", *SMALL_LOAD,
        "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--seed", "3", "--out", str(out),
    )
    _assert_common_fields(result, "run", seed=3)
    assert result["target"]["client"] == "http" and result["target"]["model"] == model.name
    assert result["workload"]["name"] == "fixed"
    assert result["workload"]["stats"]["input_tokens"]["mean"] == 24
    assert result["workload"]["vocab_size"] == json.loads((model / "config.json").read_text())[
        "vocab_size"]
    [run] = result["runs"]
    _assert_good_run(run, 4, output_len=6)
    assert all(r["prompt_tokens"] == 24 for r in run["requests"])
    assert run["summary"]["slo_attainment"] == 1.0 and run["summary"]["goodput"] > 0
    _assert_pngs(out, ["latency_cdf.png"], result)


def test_run_over_grpc_with_multi_turn_sessions(cluster, tmp_path: Path) -> None:
    spec, model = cluster
    out = tmp_path / "grpc"
    result = _bench(
        "run", "--grpc", f"{spec.host}:{spec.grpc_port}", "--model", str(model),
        "--workload", "multiturn", "--turns", "2", "--question-words", "8", "--output-len", "4",
        *SMALL_LOAD, "--out", str(out),
    )
    _assert_common_fields(result, "run", seed=0)
    assert result["target"]["client"] == "grpc" and result["workload"]["stats"]["sessions"] == 2
    [run] = result["runs"]
    _assert_good_run(run, 4, output_len=4)
    by_turn = {(r["session"], r["turn"]): r for r in run["requests"]}
    for session in (0, 1):  # the second turn carries the first turn and its answer
        assert by_turn[session, 1]["prompt_tokens"] > by_turn[session, 0]["prompt_tokens"] + 4
    _assert_pngs(out, ["latency_cdf.png"], result)


def test_sweep_reports_goodput_against_rate(cluster, tmp_path: Path) -> None:
    spec, model = cluster
    out = tmp_path / "sweep"
    result = _bench(
        "sweep", "--url", f"http://{spec.host}:{spec.port}/v1", "--model-dir", str(model),
        "--workload", "prefix", "--num-prefixes", "2", "--prefix-len", "32", "--question-len",
        "4", "--output-len", "3", "--rates", "20,5", "--slo-ttft-ms", "60000", *SMALL_LOAD,
        "--out", str(out),
    )
    _assert_common_fields(result, "sweep", seed=0)
    assert result["runs"] == []
    [sweep] = result["sweeps"]
    assert [p["rate"] for p in sweep["points"]] == [5.0, 20.0]
    assert [p["seed"] for p in sweep["points"]] == [0, 1]
    for point in sweep["points"]:
        _assert_good_run(point, 4, output_len=3)
    best = sweep["max_rate_at_attainment"]
    assert best["target"] == 0.9 and best["highest_tested_rate"] == 20.0
    _assert_pngs(out, ["latency_cdf.png", "goodput_vs_rate.png"], result)


def test_compare_starts_each_configuration(tiny_model, tmp_path: Path) -> None:
    out = tmp_path / "compare"
    result = _bench(
        "compare", "pd:1x1", "colocated:1:name=colocated", "--model", str(tiny_model("qwen2")),
        "--workload", "sharegpt", "--max-input-len", "48", "--max-output-len", "4",
        *SMALL_LOAD, "--out", str(out),
    )
    _assert_common_fields(result, "compare", seed=0)
    assert [c["label"] for c in result["configurations"]] == ["pd:1x1", "colocated"]
    assert result["configurations"][0]["prefill"] == 1
    assert result["configurations"][1]["colocated"] == 1
    assert [r["label"] for r in result["runs"]] == ["pd:1x1", "colocated"]
    prompts = []
    for run in result["runs"]:
        _assert_good_run(run, 4, output_len=None)
        prompts.append([r["prompt_tokens"] for r in run["requests"]])
    assert prompts[0] == prompts[1]  # the same requests against both
    _assert_pngs(out, ["latency_cdf.png", "comparison.png"], result)


def test_usage_errors_exit_2(tmp_path: Path, capsys) -> None:
    assert cli.main(["bench", "run", "--workload", "fixed", "--vocab-size", "500"]) == 2
    assert "needs a URL" in capsys.readouterr().err
    argv = ["bench", "run", "--url", "http://127.0.0.1:9", "--model", "m", "--workload", "fixed"]
    assert cli.main(argv) == 2
    assert "--model-dir DIR" in capsys.readouterr().err
    assert cli.main(["bench", "compare", "pd:1", "--model", str(tmp_path)]) == 2
    assert "pd:PxD" in capsys.readouterr().err


def test_structured_requests_over_http_carry_the_schema(cluster, tmp_path: Path) -> None:
    """Half the requests (a seeded sample) carry the example JSON schema as response_format;
    each answer is checked against it, the others generate max_tokens as before. (Chat
    prompts: a random token-id prompt ending in a partial UTF-8 character would put its
    replacement characters before the answer's text.)"""
    spec, model = cluster
    out = tmp_path / "structured_http"
    result = _bench(
        "run", "--url", f"http://{spec.host}:{spec.port}", "--model", str(model),
        "--workload", "multiturn", "--turns", "1", "--question-words", "8", "--output-len",
        "48", *SMALL_LOAD, "--structured-output", "json-example",
        "--structured-output-ratio", "0.5", "--out", str(out),
    )  # fmt: skip
    described = result["structured_outputs"]
    assert described["kind"] == "json" and described["http_fields"] == ["response_format"]
    assert described["ratio"] == 0.5 and len(described["requests"]) == 2
    assert "--structured-output json-example" in result["command"]
    [run] = result["runs"]
    _assert_good_run(run, 4, output_len=None)
    records = {r["index"]: r for r in run["requests"]}
    assert {i for i, r in records.items() if r["structured"]} == set(described["requests"])
    for record in records.values():
        if record["structured"]:
            assert record["structured_valid"] is not None  # checked (jsonschema)
            assert 0 < record["output_tokens"] <= 48
        else:
            assert record["structured_valid"] is None and record["output_tokens"] == 48
    counts = run["summary"]["structured_outputs"]
    assert counts["requests"] == 2 and counts["valid"] + counts["invalid"] == 2
    assert counts["valid"] == sum(r["structured_valid"] is True for r in records.values())


def test_structured_requests_over_grpc_keep_a_choice(cluster, tmp_path: Path) -> None:
    """A structured_outputs object from a file, over gRPC (SamplingParams.structured_outputs):
    every answer is one of the choices."""
    spec, model = cluster
    constraint = tmp_path / "choice.json"
    constraint.write_text(json.dumps({"choice": ["yes", "no", "maybe"]}))
    out = tmp_path / "structured_grpc"
    result = _bench(
        "run", "--grpc", f"{spec.host}:{spec.grpc_port}", "--model", str(model),
        "--workload", "multiturn", "--turns", "1", "--question-words", "8", "--output-len",
        "12", *SMALL_LOAD, "--structured-output", str(constraint), "--out", str(out),
    )  # fmt: skip
    assert result["structured_outputs"]["kind"] == "choice"
    assert result["structured_outputs"]["requests"] == [0, 1, 2, 3]
    [run] = result["runs"]
    _assert_good_run(run, 4, output_len=None)
    counts = {"requests": 4, "valid": 4, "invalid": 0, "unchecked": 0}
    assert run["summary"]["structured_outputs"] == counts
