"""Start real worker processes for tests, on free ports, and stop them afterwards."""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class WorkerProcess:
    """A `python -m <module>` worker; `address` is its gRPC host:port once READY."""

    def __init__(self, module: str, model_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--model", str(model_dir), *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"{module} did not start: {line!r}")
        self.address = line.split()[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def running(*workers_args: tuple[str, Path, tuple[str, ...]]):
    """Start the given workers (module, model dir, extra args); stop them on exit."""
    started: list[WorkerProcess] = []
    try:
        for module, model_dir, args in workers_args:
            started.append(WorkerProcess(module, model_dir, *args))
        yield started
    finally:
        for worker in started:
            worker.stop()
