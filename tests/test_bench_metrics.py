"""Per-request metrics, aggregates, SLO attainment and goodput, the highest rate at attainment,
and the small parsers around them (cluster configurations, the recorded command, the table)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.cli import add_bench_commands
from bench.cluster_config import parse_cluster_config
from bench.command_line import command_line
from bench.metrics import distribution_ms, summarize
from bench.records import RequestRecord
from bench.report import render_plain, table_rows
from bench.slo import Slo, attainment, goodput
from bench.sweep import max_rate_at_attainment


def _record(index: int, ttft: float, e2e: float, tokens: int, ok: bool = True) -> RequestRecord:
    return RequestRecord(index=index, success=ok, ttft_s=ttft if ok else None, e2e_s=e2e,
                         output_tokens=tokens, prompt_tokens=10, cached_tokens=4,
                         itl_s=[0.01] * max(tokens - 1, 0), error="" if ok else "boom")


# TTFT (s), e2e (s), tokens -> TPOT = (e2e - ttft) / (tokens - 1)
RECORDS = [
    _record(0, 0.10, 1.10, 11),  # TPOT 100 ms: meets 200 ms TTFT and 100 ms TPOT
    _record(1, 0.30, 0.80, 11),  # TTFT 300 ms: misses TTFT
    _record(2, 0.05, 2.05, 11),  # TPOT 200 ms: misses TPOT
    _record(3, 0.15, 0.15, 1),  # one token: no TPOT, meets
    _record(4, 0.0, 0.0, 0, ok=False),  # failed: always a miss
]


def test_tpot_is_time_after_the_first_token_per_later_token() -> None:
    assert RECORDS[0].tpot_s == pytest.approx(0.1)
    assert RECORDS[3].tpot_s is None and RECORDS[4].tpot_s is None
    data = RECORDS[0].to_json()
    assert data["tpot_s"] == pytest.approx(0.1) and "text" not in data
    assert RequestRecord.from_json(data) == RECORDS[0]


def test_attainment_and_goodput_need_both_limits() -> None:
    slo = Slo(ttft_ms=200, tpot_ms=100)
    assert [slo.attained_by(r) for r in RECORDS] == [True, False, False, True, False]
    assert attainment(RECORDS, slo) == pytest.approx(2 / 5)
    assert goodput(RECORDS, slo, duration_s=4.0) == pytest.approx(0.5)
    assert attainment(RECORDS, Slo(ttft_ms=200)) == pytest.approx(3 / 5)
    assert attainment(RECORDS, Slo(tpot_ms=100)) == pytest.approx(3 / 5)
    with pytest.raises(ValueError):
        Slo(attainment_target=0.0)


def test_summary_counts_throughputs_and_percentiles() -> None:
    summary = summarize(RECORDS, duration_s=2.0, slo=Slo(ttft_ms=200, tpot_ms=100))
    assert (summary["completed"], summary["failed"]) == (4, 1)
    assert summary["request_throughput"] == pytest.approx(2.0)
    assert summary["output_throughput"] == pytest.approx(34 / 2.0)
    assert summary["total_token_throughput"] == pytest.approx((34 + 40) / 2.0)
    assert summary["cached_prompt_tokens"] == 16 and summary["prompt_cache_hit_rate"] == 0.4
    assert summary["goodput"] == pytest.approx(1.0) and summary["slo_attainment"] == 0.4
    assert summary["ttft_ms"]["p50"] == pytest.approx(125.0)  # of 50, 100, 150, 300
    assert summary["ttft_ms"]["max"] == pytest.approx(300.0)
    assert summary["tpot_ms"]["mean"] == pytest.approx((100 + 50 + 200) / 3)
    assert summary["errors"] == ["boom"]
    assert summarize(RECORDS, 2.0, Slo())["goodput"] is None


def test_distribution_of_nothing_is_all_none() -> None:
    assert set(distribution_ms([]).values()) == {None}
    assert distribution_ms([0.001, 0.003])["p50"] == pytest.approx(2.0)


def test_highest_rate_at_attainment_interpolates_the_crossing() -> None:
    points = [(4.0, 0.5), (1.0, 1.0), (2.0, 0.95), (3.0, 0.85)]
    best = max_rate_at_attainment(points, 0.9)
    assert best["highest_tested_rate"] == 2.0 and best["reached_limit"]
    assert best["interpolated_rate"] == pytest.approx(2.5)
    never = max_rate_at_attainment([(1.0, 0.5)], 0.9)
    assert never["highest_tested_rate"] is None and never["interpolated_rate"] is None
    always = max_rate_at_attainment([(1.0, 1.0), (2.0, 0.9)], 0.9)
    assert always["highest_tested_rate"] == 2.0 and not always["reached_limit"]


def test_cluster_configurations_parse() -> None:
    text = "pd:2x1:policy=round_robin:max-num-seqs=8"
    pd = parse_cluster_config(text)
    assert (pd.prefill, pd.decode, pd.colocated, pd.policy) == (2, 1, 0, "round_robin")
    assert pd.worker_args == ["--max-num-seqs", "8"] and pd.label == text
    co = parse_cluster_config("colocated:2:no-enable-prefix-caching:name=nocache")
    assert (co.colocated, co.label) == (2, "nocache")
    assert co.worker_args == ["--no-enable-prefix-caching"]
    spec = co.spec(Path("m"), port=1, grpc_port=2)
    assert (spec.colocated, spec.port, spec.grpc_port) == (2, 1, 2)
    # compare's warm-up sends at least this many requests at once, to reach every worker
    assert (pd.workers_per_role(), co.workers_per_role()) == (2, 2)
    for bad in ("pd:1", "pd:0x1", "colocated:x", "ray:2", "pd:1x1:frobnicate=1", "pd:1x1:policy"):
        with pytest.raises(ValueError):
            parse_cluster_config(bad)


def test_the_recorded_command_spells_out_every_option() -> None:
    parser = argparse.ArgumentParser(prog="baton bench")
    add_bench_commands(parser)
    args = parser.parse_args(["compare", "pd:1x1", "colocated:2", "--num-requests", "4",
                              "--no-ignore-eos", "--rates", "1,2.5"])
    text = command_line(args.bench_parser, args, "baton bench compare")
    assert text.startswith("baton bench compare ") and text.endswith(" pd:1x1 colocated:2")
    for part in ("--num-requests 4", "--no-ignore-eos", "--rates 1.0,2.5", "--seed 0",
                 "--workload sharegpt"):
        assert part in text
    again = parser.parse_args(text.split()[2:])
    assert vars(again) | {"bench_parser": None} == vars(args) | {"bench_parser": None}


def test_the_plain_table_lines_up_the_runs() -> None:
    summary = summarize(RECORDS, 2.0, Slo(ttft_ms=200, tpot_ms=100))
    rows = table_rows([("a", summary), ("b", summary)])
    assert rows[0] == ["metric", "a", "b"]
    text = render_plain(rows)
    assert "TTFT p50 (ms)" in text and "40.0%" in text
    assert len({len(line) for line in text.splitlines()}) == 1
