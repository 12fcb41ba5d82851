"""STYLE.md's habit, held: no function of the project's own code is over 60 lines, except the
Triton kernels themselves (`@triton.jit`), whose bodies are one GPU program each."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "baton_kernels", "bench", "cluster", "common", "decode_service", "engine", "experiments",
    "kv_transfer", "launcher", "prefill_service", "prefix_index", "proto", "router",
    "worker_common",
)  # fmt: skip
MAX_LINES = 60


def long_functions(path: Path, limit: int = MAX_LINES) -> list[str]:
    """`name (N lines)` of each function in `path` longer than `limit` lines, jit kernels aside."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if any("jit" in ast.unparse(d) for d in node.decorator_list):
            continue
        lines = (node.end_lineno or node.lineno) - node.lineno + 1
        if lines > limit:
            found.append(f"{node.name} ({lines} lines)")
    return found


def test_the_scan_finds_long_functions() -> None:
    assert long_functions(ROOT / "engine" / "core.py", limit=5)
    assert not long_functions(ROOT / "engine" / "core.py", limit=10_000)


def test_no_function_is_over_60_lines() -> None:
    too_long = {
        str(path.relative_to(ROOT)): found
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if "_pb2" not in path.name and (found := long_functions(path))
    }
    assert not too_long, too_long
