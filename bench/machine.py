"""A description of the machine a benchmark ran on, and of the code it ran, for its result JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, memory, load, OS, Python, torch and its thread count."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        # when the result is written: above the core count, other processes competed with the
        # benchmark for the CPUs
        "load_average": load_average(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (runnable processes, all cores together)."""
    return [round(x, 2) for x in os.getloadavg()]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        out = subprocess.run(["free", "-b"], capture_output=True, text=True, check=True).stdout
        return round(int(out.splitlines()[1].split()[1]) / 2**30, 1)
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        return None


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark ran from ('+dirty' if its code had uncommitted
    changes), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        # results written since the last commit are not code: they leave the tree clean
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)bench/results"],
                               cwd=root, capture_output=True, text=True, check=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")
