"""Shared pytest fixtures: the demo model and tiny random-weight models.

Both are built once per test session; the demo model is also cached on disk across sessions
(see engine.models.demo), so only the first session on a machine pays its ~25 s conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

TinyModelFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a local Hugging Face directory, in Baton's default cache."""
    from engine.models.demo import ensure_demo_model

    return ensure_demo_model(progress=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """Factory `tiny_model(arch, seed=0) -> Path` of small random-weight model directories.

    Each (arch, seed) is written once per session, into the session's temporary directory.
    """
    built: dict[tuple[str, int], Path] = {}

    def make(arch: str, seed: int = 0) -> Path:
        key = (arch, seed)
        if key not in built:
            from engine.models.tiny import make_tiny_model

            target = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
            built[key] = make_tiny_model(target, arch, seed)
        return built[key]

    return make


@pytest.fixture()
def redis_server():
    """A fresh `redis-server` on a free port for one test (stopped afterwards)."""
    from bench.local_redis import RedisServer

    server = RedisServer()
    yield server
    server.stop()
