"""Benchmark workload generators: their distributions, their determinism, and the trace format."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from bench.multi_turn import WORDS, MultiTurn
from bench.shared_prefix import SharedPrefix, zipf_probabilities
from bench.synthetic import FixedLengths, ShareGPTLike, long_context
from bench.trace import TraceReplay
from bench.workload import FIRST_ORDINARY_TOKEN_ID, WORKLOAD_NAMES, Message, prompt_kind
from bench.workloads import WORKLOADS, build_workload

VOCAB = 1000


def _lengths(requests: list) -> np.ndarray:
    return np.array([len(r.prompt) for r in requests])


def test_every_named_workload_has_a_generator() -> None:
    assert set(WORKLOADS) == set(WORKLOAD_NAMES)


@pytest.mark.parametrize("workload", [FixedLengths(16, 4, 0.5), ShareGPTLike(), long_context(64),
                                      SharedPrefix(4, 32, 8), MultiTurn(3)])
def test_same_seed_same_requests_other_seed_other_requests(workload) -> None:
    a = workload.generate(20, 7, VOCAB)
    assert a == workload.generate(20, 7, VOCAB)
    assert [r.prompt for r in a] != [r.prompt for r in workload.generate(20, 8, VOCAB)]
    assert [r.index for r in a] == list(range(20))


def test_fixed_lengths_are_uniform_within_the_range_ratio() -> None:
    exact = FixedLengths(input_len=50, output_len=7).generate(30, 0, VOCAB)
    assert set(_lengths(exact)) == {50} and {r.max_tokens for r in exact} == {7}
    spread = FixedLengths(input_len=100, output_len=20, range_ratio=0.5).generate(4000, 1, VOCAB)
    lengths = _lengths(spread)
    assert lengths.min() >= 50 and lengths.max() <= 150
    assert abs(lengths.mean() - 100) < 2.5
    assert min(r.max_tokens for r in spread) >= 10 and max(r.max_tokens for r in spread) <= 30


def test_token_ids_avoid_special_tokens_and_stay_in_the_vocabulary() -> None:
    ids = np.concatenate([r.prompt for r in ShareGPTLike().generate(50, 0, VOCAB)])
    assert ids.min() >= FIRST_ORDINARY_TOKEN_ID and ids.max() < VOCAB
    with pytest.raises(ValueError, match="vocabulary size"):
        ShareGPTLike().generate(2, 0, None)


def test_sharegpt_lengths_follow_the_documented_lognormals() -> None:
    workload = ShareGPTLike(max_input=10**6, max_output=10**6, min_input=1)
    requests = workload.generate(4000, 3, VOCAB)
    inputs = _lengths(requests)
    outputs = np.array([r.max_tokens for r in requests])
    for values, median, sigma in ((inputs, 160, 1.0), (outputs, 180, 0.9)):
        assert abs(np.median(values) / median - 1) < 0.06
        assert abs(np.log(values).std() - sigma) < 0.05
        assert abs(values.mean() / (median * math.exp(sigma**2 / 2)) - 1) < 0.1


def test_sharegpt_clipping_shortens_the_same_requests() -> None:
    wide = ShareGPTLike().generate(40, 0, VOCAB)
    clipped = ShareGPTLike(max_input=128, max_output=16).generate(40, 0, VOCAB)
    assert _lengths(clipped).max() == 128 and max(r.max_tokens for r in clipped) == 16
    for a, b in zip(wide, clipped, strict=True):
        assert a.prompt[: len(b.prompt)] == b.prompt
        assert b.max_tokens == min(a.max_tokens, 16)


def test_zipf_probabilities() -> None:
    probs = zipf_probabilities(4, 1.0)
    assert np.allclose(probs, np.array([1, 1 / 2, 1 / 3, 1 / 4]) / (25 / 12))
    assert np.allclose(zipf_probabilities(5, 0.0), 0.2)


def test_shared_prefix_tenants_follow_zipf_and_share_exactly_their_prompt() -> None:
    workload = SharedPrefix(num_prefixes=5, prefix_len=32, question_len=8, zipf_s=1.2)
    requests = workload.generate(5000, 0, VOCAB)
    counts = Counter(r.tenant for r in requests)
    observed = np.array([counts[f"tenant-{k}"] for k in range(5)]) / len(requests)
    assert list(observed) == sorted(observed, reverse=True)
    assert np.abs(observed - zipf_probabilities(5, 1.2)).max() < 0.02
    prefixes = {r.tenant: r.prompt[:32] for r in requests}
    assert len({tuple(p) for p in prefixes.values()}) == 5
    assert all(r.prompt[:32] == prefixes[r.tenant] for r in requests)
    assert len({tuple(r.prompt[32:]) for r in requests}) == len(requests)  # distinct questions
    assert set(_lengths(requests)) == {40}


def test_multi_turn_sessions_grow_turn_by_turn() -> None:
    requests = MultiTurn(num_turns=3, question_words=12, system_words=5).generate(7, 0, None)
    assert [(r.session, r.turn) for r in requests] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)
    ]
    assert all(prompt_kind(r.prompt) == "messages" for r in requests)
    first = cast(list[Message], requests[0].prompt)
    second = cast(list[Message], requests[1].prompt)
    assert [m["role"] for m in first] == ["system", "user"]
    assert [m["role"] for m in second] == ["user"]
    words = second[0]["content"].rstrip("?").lower().split()
    assert len(words) == 12 and set(words) <= set(WORDS)


def _write_trace(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_trace_replay_reads_prompts_times_and_sessions(tmp_path: Path) -> None:
    trace = _write_trace(tmp_path / "t.jsonl", [
        {"timestamp": 10.0, "prompt": "hello", "max_tokens": 5},
        "# a comment",
        {"timestamp": 11.0, "prompt": [101, 102], "tenant": "acme"},
        {"timestamp": 12.0, "messages": [{"role": "user", "content": "a"}], "session_id": 9},
        {"timestamp": 14.0, "messages": [{"role": "user", "content": "b"}], "session_id": 9},
    ])
    requests = TraceReplay(trace, speedup=2.0, default_max_tokens=7).generate(10, 0, None)
    assert [r.arrival_s for r in requests] == [0.0, 0.5, 1.0, 2.0]
    assert [r.max_tokens for r in requests] == [5, 7, 7, 7]
    assert requests[1].prompt == [101, 102] and requests[1].tenant == "acme"
    assert [(r.session, r.turn) for r in requests] == [(None, 0), (None, 0), (0, 0), (0, 1)]
    assert len(TraceReplay(trace).generate(2, 0, None)) == 2


@pytest.mark.parametrize("row, message", [
    ({"prompt": "a", "messages": []}, "exactly one"),
    ({"prompt": 5}, "'prompt' must be"),
    ({"prompt": [1, 2], "session_id": "s"}, "not token ids"),
    ("{not json", "not JSON"),
])
def test_trace_errors_name_the_line(tmp_path: Path, row, message: str) -> None:
    trace = _write_trace(tmp_path / "bad.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(ValueError, match=message) as info:
        TraceReplay(trace).generate(10, 0, None)
    assert "bad.jsonl:2" in str(info.value)


def test_build_workload_maps_options_and_rejects_foreign_ones(tmp_path: Path) -> None:
    workload = build_workload("prefix", {"num_prefixes": 3, "output_len": 9, "input_len": None})
    assert isinstance(workload, SharedPrefix)
    assert (workload.num_prefixes, workload.output_len) == (3, 9)
    assert build_workload("multiturn", {"turns": 5}).describe()["num_turns"] == 5
    with pytest.raises(ValueError, match="--zipf-s"):
        build_workload("fixed", {"zipf_s": 1.0})
    with pytest.raises(ValueError, match="--trace FILE"):
        build_workload("trace", {})
    with pytest.raises(ValueError, match="not found"):
        build_workload("trace", {"trace": str(tmp_path / "missing.jsonl")})
