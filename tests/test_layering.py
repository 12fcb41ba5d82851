"""Imports point down (DESIGN.md): nothing but the CLI imports `launcher`, bench runs clusters
through `cluster`, and the router imports neither."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports (absolute imports, at any depth in the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def offenders(package: str, forbidden: set[str]) -> dict[str, set[str]]:
    """Modules of `package` that import any of `forbidden`, with what they import."""
    found = {
        str(path.relative_to(ROOT)): imported_packages(path) & forbidden
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    return {name: bad for name, bad in found.items() if bad}


def test_the_scan_sees_imports() -> None:
    assert {"cluster", "bench"} <= imported_packages(ROOT / "bench" / "compare.py")
    assert "launcher" in imported_packages(ROOT / "launcher" / "__main__.py")


def test_bench_does_not_import_launcher() -> None:
    assert offenders("bench", {"launcher"}) == {}


def test_the_router_imports_neither_launcher_nor_cluster() -> None:
    assert offenders("router", {"launcher", "cluster"}) == {}


def test_only_the_cli_imports_launcher() -> None:
    for package in ("cluster", "engine", "worker_common", "prefill_service", "decode_service",
                    "prefix_index", "kv_transfer", "proto"):  # fmt: skip
        assert offenders(package, {"launcher"}) == {}, package
