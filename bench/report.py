"""The summary table printed after a benchmark: one column per run, side by side.

Drawn with rich when it is installed, else as plain aligned text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Row = tuple[str, Callable[[dict[str, Any]], str]]


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _latency(metric: str, stat: str) -> Callable[[dict[str, Any]], str]:
    return lambda s: _num((s.get(f"{metric}_ms") or {}).get(stat))


def _pct(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda s: "-" if s.get(key) is None else f"{100 * s[key]:.1f}%"


ROWS: list[Row] = [
    ("requests ok / failed", lambda s: f"{s['completed']} / {s['failed']}"),
    ("duration (s)", lambda s: _num(s["duration_s"], 2)),
    ("requests/s", lambda s: _num(s["request_throughput"], 3)),
    ("output tokens/s", lambda s: _num(s["output_throughput"])),
    ("total tokens/s", lambda s: _num(s["total_token_throughput"])),
    ("TTFT mean (ms)", _latency("ttft", "mean")),
    ("TTFT p50 (ms)", _latency("ttft", "p50")),
    ("TTFT p90 (ms)", _latency("ttft", "p90")),
    ("TTFT p99 (ms)", _latency("ttft", "p99")),
    ("TPOT mean (ms)", _latency("tpot", "mean")),
    ("TPOT p50 (ms)", _latency("tpot", "p50")),
    ("TPOT p90 (ms)", _latency("tpot", "p90")),
    ("TPOT p99 (ms)", _latency("tpot", "p99")),
    ("ITL p50 (ms)", _latency("itl", "p50")),
    ("ITL p99 (ms)", _latency("itl", "p99")),
    ("E2E mean (ms)", _latency("e2e", "mean")),
    ("E2E p90 (ms)", _latency("e2e", "p90")),
    ("cached prompt tokens", lambda s: f"{s['cached_prompt_tokens']:,}"),
    ("prompt cache hit rate", _pct("prompt_cache_hit_rate")),
    ("SLO attainment", _pct("slo_attainment")),
    ("goodput (req/s)", lambda s: _num(s.get("goodput"), 3)),
    ("structured: valid / invalid / unchecked", lambda s: _structured(s.get("structured_outputs"))),
]


def _structured(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "-"
    return f"{counts['valid']} / {counts['invalid']} / {counts['unchecked']}"


def table_rows(columns: Sequence[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    """The table as text cells: a header row, then one row per metric."""
    rows = [["metric", *(label for label, _ in columns)]]
    rows += [[name, *(fmt(summary) for _, summary in columns)] for name, fmt in ROWS]
    return rows


def render_plain(rows: list[list[str]]) -> str:
    """Aligned text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:],
                                                                       strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_summary(columns: Sequence[tuple[str, dict[str, Any]]], title: str = "") -> None:
    """Print the side-by-side summary of `columns` ((label, summary) pairs) to stdout."""
    rows = table_rows(columns)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"{title}\n{render_plain(rows)}" if title else render_plain(rows))
        return
    table = Table(title=title or None)
    table.add_column(rows[0][0])
    for header in rows[0][1:]:
        table.add_column(header, justify="right")
    for row in rows[1:]:
        table.add_row(*row)
    Console().print(table)
