import pytest
import torch

from trainer.config.sections import ScheduleConfig
from trainer.runtime.schedule import build_scheduler, lr_factor


@pytest.mark.parametrize("step,factor", [(0, 1.0), (99, 1.0), (100, 1.0), (150, 0.5), (199, 0.01)])
def test_linear_is_constant_then_decays_to_zero(step, factor):
    assert lr_factor(step, ScheduleConfig(kind="linear", decay_start=0.5), 200) == pytest.approx(factor)


@pytest.mark.parametrize("step,factor", [(0, 0.1), (4, 0.5), (9, 1.0), (10, 1.0), (55, 0.5), (100, 0.0)])
def test_cosine_with_warmup(step, factor):
    cfg = ScheduleConfig(kind="cosine", warmup_steps=10)
    assert lr_factor(step, cfg, 100) == pytest.approx(factor, abs=1e-9)


def test_constant_with_warmup():
    cfg = ScheduleConfig(kind="constant", warmup_steps=4)
    assert [lr_factor(s, cfg, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_scheduler_drives_the_optimizer_lr():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    sched = build_scheduler(opt, ScheduleConfig(kind="linear", decay_start=0.5), 10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:6] == pytest.approx([2e-4] * 6)
    assert lrs[6:] == pytest.approx([1.6e-4, 1.2e-4, 0.8e-4, 0.4e-4])
