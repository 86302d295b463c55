"""Hardware detection: the automatic dtype (bf16 where the device computes it natively), CPU allocator
tuning."""

from __future__ import annotations

import pytest


def test_dtype_auto_is_bf16_on_cuda_and_on_cpus_with_native_bf16(tmp_path, monkeypatch):
    import torch

    import pretrain.hardware as hardware
    import pretrain.train as train

    flags = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {}\nbugs\t\t: none\n"
    for extra, native in (("", False), ("avx512_bf16", True), ("amx_bf16 amx_tile", True),
                          ("avx512bw", False)):
        (tmp_path / "cpuinfo").write_text(flags.format(extra))
        assert hardware.cpu_has_native_bf16.__wrapped__(str(tmp_path / "cpuinfo")) is native, extra
    # not Linux: fp32
    assert hardware.cpu_has_native_bf16.__wrapped__(str(tmp_path / "no-such-file")) is False
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (False, True):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda native=native: native)
        assert train.autocast_dtype(cpu, "auto") == (torch.bfloat16 if native else torch.float32)
        assert (train.autocast_dtype(cpu, "fp32") == torch.float32
                and train.autocast_dtype(cpu, "bf16") == torch.bfloat16)
        assert (train.autocast_dtype(cuda, "auto") == torch.bfloat16
                and train.autocast_dtype(cuda, "fp32") == torch.float32)


def test_cpu_allocator_tuning_respects_the_users_choice(monkeypatch):
    import sys

    import pretrain.hardware as hardware

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc tuning is for Linux")
    for var, value in (("MALLOC_TRIM_THRESHOLD_", "0"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"),
                       ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")):
        with monkeypatch.context() as m:
            m.setenv(var, value)
            assert hardware.tune_cpu_allocator.__wrapped__() is False, var
    import ctypes.util

    if ctypes.util.find_library("c") and "libc.so.6" in (ctypes.util.find_library("c") or ""):
        assert hardware.tune_cpu_allocator.__wrapped__() is True  # glibc: applied
