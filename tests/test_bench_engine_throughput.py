"""The offline throughput benchmark: one tiny end-to-end run, and its warm-up kept apart."""

from __future__ import annotations

import json
from pathlib import Path

from bench import engine_throughput
from bench.engine_throughput import main, make_prompts


def test_tiny_run_against_transformers(tiny_model, tmp_path: Path, monkeypatch) -> None:
    warmups: list[list[list[int]]] = []
    real = engine_throughput.load_baton

    def spy(model_dir, num_requests, warmup):
        warmups.append(warmup)
        return real(model_dir, num_requests, warmup)

    monkeypatch.setattr(engine_throughput, "load_baton", spy)
    out = tmp_path / "throughput.json"
    argv = ["--model", str(tiny_model("llama")), "--num-requests", "3", "--min-prompt", "8"]
    argv += ["--max-prompt", "24", "--output-len", "4", "--out", str(out)]
    result = main(argv)

    assert json.loads(out.read_text()) == result
    assert result["baton"]["output_tokens"] == 3 * 4
    assert result["transformers_generate_batched"]["output_tokens"] == 3 * 4
    assert result["identical_greedy_outputs"] == "3/3"
    assert result["speedup_vs_batched"] > 0 and result["speedup_vs_sequential"] > 0
    for name in ("baton", "transformers_generate_batched", "transformers_generate_sequential"):
        samples = result[name]["seconds_samples"]
        assert len(samples) == 2 and result[name]["seconds"] == min(samples)
    assert result["command"].startswith("python -m bench.engine_throughput --model")
    # the warm-up prompts are not the measured ones (another seed)
    vocab = json.loads((tiny_model("llama") / "config.json").read_text())["vocab_size"]
    measured = make_prompts(vocab, 3, 8, 24, seed=0)
    assert len(warmups) == 1 and len(warmups[0]) == 2
    assert not any(w[:4] == p[:4] for w in warmups[0] for p in measured)
