"""What a result cached outside DVC's outputs depends on besides its inputs and settings: the
processor it was computed on (kernels, and so the last bits of a result, may differ by
model)."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, as the kernel reports it (else what Python knows of it)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu {line.partition(':')[2].strip()}"
    return f"cpu {platform.machine()} {platform.processor()}".strip()
