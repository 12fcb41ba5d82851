"""A description of the machine a benchmark ran on, for its result JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, memory, OS, Python, torch and its thread count."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


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
