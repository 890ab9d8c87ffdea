"""The machine a stage runs on: the processor a result cached outside DVC's outputs was
computed on (kernels, and so the last bits of a result, may differ by model), and the cores
this process may use."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, as the kernel reports it (else what Python knows of it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu {line.partition(':')[2].strip()}"
    return f"cpu {platform.machine()} {platform.processor()}".strip()


def usable_cores() -> int:
    """How many cores this process may run on (its CPU affinity where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
