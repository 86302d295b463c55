"""What the machine can do, and how to use it: the device, the autocast dtype, whether to compile, the peak
FLOP/s for MFU, and runtime settings that make the most of a CPU."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

import torch

from pretrain.config import ConfigError


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
    """Whether bf16 matrix products are native on ``device``: CUDA, or a CPU with
    :func:`cpu_has_native_bf16`."""
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


# Dense bf16 peak FLOP/s (no sparsity) by device-name substring, most specific first; for MFU.
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
              ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
              ("A10G", 70e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} was asked for but no CUDA device is available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ConfigError(f"device {spec!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def autocast_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """bf16 autocast where 'bf16' is asked for, and by default ('auto') on CUDA and on CPUs with native bf16
    (:func:`native_bf16`); fp32 otherwise."""
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "auto" and native_bf16(device):
        return torch.bfloat16
    return torch.float32


def autocast_context(device: torch.device, dtype: str):
    if autocast_dtype(device, dtype) == torch.bfloat16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """train.compile: true / false, or 'auto': on CUDA, where compilation pays for itself quickly."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, if known (for MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS:  # most specific names first
        if key in name:
            return value
    return None
