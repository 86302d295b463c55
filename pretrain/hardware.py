"""What the machine can do, and runtime settings that make the most of it (torch only, nothing of the project)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU runs bf16 matrix products in hardware (x86 AVX512-BF16 or AMX, as /proc/cpuinfo lists
    them): there bf16 autocast trains ~1.5-2x faster than fp32; elsewhere bf16 is emulated and slower."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:  # not Linux: no way to tell, so no
        return False
    flags = next((ln.split(":", 1)[-1].split() for ln in lines if ln.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products are native on ``device``: CUDA, or a CPU with :func:`cpu_has_native_bf16`."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


@functools.cache
def tune_cpu_allocator() -> bool:
    """For training on a CPU: make glibc's malloc keep freed memory for reuse, as the jemalloc / tcmalloc that
    PyTorch's CPU performance guide recommends do. By default glibc gives every large block (a tensor of more
    than a few MiB: activations, logits, gradients) fresh pages from the kernel and returns them when freed,
    so each step faults in again, page by page, memory it just had; on a small model that costs ~10-15% of
    the step. Here blocks up to 32 MiB come from the heap and up to 1 GiB of freed heap is kept
    (``mallopt``: M_MMAP_THRESHOLD, M_TRIM_THRESHOLD). Process-wide and once; skipped off Linux/glibc and
    where the user chose for themselves (those MALLOC_* / GLIBC_TUNABLES variables, or another allocator in
    LD_PRELOAD). Returns whether it was applied."""
    import ctypes

    if not sys.platform.startswith("linux") or any(v in os.environ for v in _MALLOC_ENV) \
            or "malloc" in os.environ.get("LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
