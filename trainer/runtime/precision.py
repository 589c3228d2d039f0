"""train.precision=auto: bf16 where the hardware computes it natively, fp32 elsewhere.

A CPU without bf16 instructions (AVX512-BF16 or AMX) emulates bf16 autocast: on such a CPU (AVX-512 without BF16)
the CUT demo ran 2x slower than in fp32 and learned +3 dB instead of +12 dB in its 600 steps; AVX2 machines were
reported 10x slower. GPUs that support bf16 (Ampere and newer) get it; others fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
"""Flags of /proc/cpuinfo that mean the CPU computes bf16 natively."""


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's flags in `cpuinfo` (empty where there is no such file, e.g. macOS)."""
    try:
        with open(cpuinfo, errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def resolve_precision(requested: str, on_cuda: bool, flags: set[str] | None = None) -> tuple[str, str]:
    """(the precision to train in, why) for train.precision=`requested`; anything but `auto` is kept."""
    if requested != "auto":
        return requested, "as configured"
    if on_cuda:
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU computes bf16"
        return "fp32", "auto: the GPU has no bf16"
    native = sorted(set(BF16_CPU_FLAGS) & (cpu_flags() if flags is None else flags))
    if native:
        return "bf16", f"auto: the CPU computes bf16 ({native[0]})"
    return "fp32", "auto: the CPU has no bf16 instructions (AVX512-BF16, AMX), where bf16 is emulated"
