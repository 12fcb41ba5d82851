"""Imports point down (DESIGN.md): nothing but the CLI imports `launcher`, bench runs clusters
through `cluster`, and the router imports neither; the engine imports no service and not the
router; the router and `common` load no torch, and `common` imports neither the engine nor the
router."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_the_engine_imports_no_service_and_no_router() -> None:
    """The offline API parses tool calls with `common.tools`, as the router does."""
    services = {"router", "prefill_service", "decode_service", "worker_common", "cluster"}
    assert offenders("engine", services) == {}


def test_only_the_cli_imports_launcher() -> None:
    for package in ("cluster", "engine", "worker_common", "prefill_service", "decode_service",
                    "prefix_index", "kv_transfer", "proto"):  # fmt: skip
        assert offenders(package, {"launcher"}) == {}, package


# --- the router and `common` are torch-free --------------------------------------------------


def modules(package: str) -> list[str]:
    """Every module of `package`, dotted (packages by their own name)."""
    names = []
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def loaded_after(code: str) -> set[str]:
    """Top-level packages in sys.modules after running `code` in a fresh interpreter."""
    script = f"{code}\nimport sys\nprint(' '.join({{m.split('.')[0] for m in sys.modules}}))"
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_common_imports_neither_engine_nor_router() -> None:
    assert offenders("common", {"engine", "router", "torch", "launcher", "cluster"}) == {}


def test_the_router_imports_no_engine_and_no_torch() -> None:
    assert offenders("router", {"engine", "torch"}) == {}


def test_importing_every_router_and_common_module_loads_no_torch() -> None:
    names = modules("router") + modules("common")
    assert {"router.server", "router.openai.app", "common.completion"} <= set(names)
    loaded = loaded_after(f"import importlib\nfor name in {names!r}: importlib.import_module(name)")
    assert {"router", "common", "fastapi", "grpc"} <= loaded  # the scan above ran
    assert "torch" not in loaded and "engine" not in loaded


def test_the_router_tokenizes_and_detokenizes_without_torch(tiny_model) -> None:
    """Loading the tokenizer (and rendering a chat, tracking a completion) is what used to pull
    torch into the router: transformers' AutoTokenizer imports it."""
    code = f"""
from common.completion import CompletionTracker
from common.sampling_params import SamplingParams
from common.tokenizer import load_tokenizer
from router.preprocess import Preprocessor
tok = load_tokenizer({str(tiny_model("qwen2"))!r})
pre = Preprocessor(tok, "m", len(tok), lambda: 4096)
text, ids = pre.render_chat([{{"role": "user", "content": "hi"}}])
request = pre.build("r", ids, SamplingParams(max_tokens=None, stop=["town"]), text)
tracker = CompletionTracker(0, tok, request.params, ids)
tracker.add(tok.encode(" a little town"))
assert tracker.text == " a little " and request.params.max_tokens == 4096 - len(ids)
"""
    loaded = loaded_after(code)
    assert "transformers" in loaded and "torch" not in loaded
