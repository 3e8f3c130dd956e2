"""What every benchmark shares: the machine a result was measured on."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch
import torchvision

from crosskd_cli.engine.accelerator import native_bf16


def machine() -> dict[str, Any]:
    """The machine, recorded beside every benchmark result: CPU model and cores (all, and
    those this process may use), torch's threads, memory, native bf16, the GPU, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # not POSIX
        memory = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "threads": torch.get_num_threads(),
        "memory_gib": memory,
        "native_bf16_cpu": native_bf16("cpu"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }
