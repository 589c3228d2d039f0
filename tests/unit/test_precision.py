"""train.precision=auto: bf16 only where the hardware computes it natively (trainer.runtime.precision)."""

from __future__ import annotations

import torch

from trainer.config.sections import DistributedConfig, OptimizerConfig, TrainConfig
from trainer.runtime.engine import Engine
from trainer.runtime.precision import cpu_flags, resolve_precision

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbugs\t\t: none\n\nprocessor\t: 1\nflags\t: x\n"


def test_cpu_flags_are_the_first_processors(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra="avx512_bf16"))
    assert cpu_flags(path) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_auto_is_bf16_only_on_a_cpu_that_computes_it():
    assert resolve_precision("auto", False, {"avx2", "avx512f", "amx_bf16"}) == (
        "bf16", "auto: the CPU computes bf16 (amx_bf16)"
    )  # fmt: skip
    assert resolve_precision("auto", False, {"avx2", "avx512_bf16"})[0] == "bf16"
    precision, why = resolve_precision("auto", False, {"avx2", "avx512f", "avx512_vnni"})
    assert precision == "fp32" and "no bf16 instructions" in why


def test_an_explicit_precision_is_kept_whatever_the_hardware():
    for precision in ("fp32", "bf16", "fp16"):
        assert resolve_precision(precision, False, set()) == (precision, "as configured")


def test_the_engine_trains_in_the_resolved_precision():
    engine = Engine(DistributedConfig(cpu=True), TrainConfig(precision="auto"), OptimizerConfig())
    expected, _ = resolve_precision("auto", False)
    assert engine.precision == engine.train_cfg.precision == expected
    assert isinstance(engine.autocast(), torch.autocast) == (expected == "bf16")
