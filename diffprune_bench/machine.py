"""What a record says about the machine that ran it: the device's name and the CPU's kernels.

A run repeats bit for bit only on a CPU whose kernels reduce floats in the same order (the same
capability, in practice the same model); elsewhere training amplifies last-bit differences into other
weights. Records carry this so a reader can tell which of two differing runs should have agreed.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

#: the /proc/cpuinfo keys that name the CPU model (x86, most ARM kernels, others)
CPUINFO_MODEL_KEYS = ("model name", "Processor", "cpu model")


def _platform_cpu() -> str:
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else what the platform calls the CPU (the latency cache keys on it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _platform_cpu()


def cpu_description() -> dict[str, str]:
    """The CPU's model name and the vector instruction set torch's kernels use on it."""
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in CPUINFO_MODEL_KEYS:
                model = value.strip()
                break
    return {"model": model or _platform_cpu(), "capability": torch.backends.cpu.get_cpu_capability()}
