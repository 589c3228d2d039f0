"""The two steps touch only their own unit, and every loss term reaches the gradients only through its weight."""

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.algorithms.cyclegan import build_units, discriminator_step, generator_step
from trainer.algorithms.losses import discriminator_loss, generator_adv_loss
from trainer.config.model import LossConfig, ModelConfig
from trainer.config.sections import DistributedConfig, OptimizerConfig, TrainConfig
from trainer.runtime.engine import Engine

SMALL = dict(generator="resnet", n_blocks=1, ngf=4, ndf=4, n_layers_d=2)


def small_units(discriminator="patchgan", **loss):
    torch.manual_seed(0)
    loss_cfg = LossConfig(**loss)
    return build_units(ModelConfig(discriminator=discriminator, **SMALL), loss_cfg) + (loss_cfg,)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def prepared(gens, discs):
    engine = Engine(DistributedConfig(cpu=True), TrainConfig(), OptimizerConfig())
    opts = {n: torch.optim.Adam(u.parameters(), lr=1e-2) for n, u in (("g", gens), ("d", discs))}
    scheds = {n: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for n, o in opts.items()}
    return engine, engine.prepare({"g": gens, "d": discs}, opts, scheds)


@pytest.mark.parametrize("kind", ["patchgan", "hnet"])
def test_generator_step_leaves_discriminators_untouched(kind):
    gens, discs, cfg = small_units(kind, lambda_feature=1.0 if kind == "hnet" else 0.0)
    engine, units = prepared(gens, discs)
    d_before, g_before = snapshot(discs), snapshot(gens)
    real_x, real_y = batch()
    with engine.frozen("d") as plain:
        loss, _, _ = generator_step(units["g"], plain, real_x, real_y, cfg)
        engine.backward(loss, "g")
        engine.step("g")
    for name, param in discs.named_parameters():
        assert torch.equal(param, d_before[name]), name
        assert param.grad is None, name
        assert param.requires_grad, f"{name} left frozen"
    assert any(not torch.equal(p, g_before[n]) for n, p in gens.named_parameters())


def test_discriminator_step_leaves_generators_untouched():
    gens, discs, cfg = small_units()
    engine, units = prepared(gens, discs)
    real_x, real_y = batch()
    out = gens(real_x, real_y)
    d_before, g_before = snapshot(discs), snapshot(gens)
    loss, stats = discriminator_step(units["d"], real_x, real_y, out["fake_x"], out["fake_y"], cfg)
    engine.backward(loss, "d")
    engine.step("d")
    for name, param in gens.named_parameters():
        assert torch.equal(param, g_before[name]), name
        assert param.grad is None, name
    assert all(not torch.equal(p, d_before[n]) for n, p in discs.named_parameters() if p.dim() > 1)
    assert stats["loss/d_total"] == pytest.approx(float(stats["loss/d_x"] + stats["loss/d_y"]))


def expected_loss(gens, discs, x, y, cfg):
    """The generator objective written out independently of cyclegan.py."""
    g, f = gens.g_xy, gens.g_yx
    fake_y, fake_x = g(x), f(y)
    total = cfg.lambda_adv * (((discs.d_y(fake_y) - 1) ** 2).mean() + ((discs.d_x(fake_x) - 1) ** 2).mean())
    total = total + cfg.lambda_cycle * ((f(fake_y) - x).abs().mean() + (g(fake_x) - y).abs().mean())
    total = total + cfg.lambda_cycle * cfg.lambda_identity * ((f(x) - x).abs().mean() + (g(y) - y).abs().mean())
    total = total + cfg.lambda_preserve * ((fake_y - x).abs().mean() + (fake_x - y).abs().mean())
    if cfg.lambda_feature:
        h = discs.trunk
        total = total + cfg.lambda_feature * ((h(f(fake_y)) - h(x)).abs().mean() + (h(g(fake_x)) - h(y)).abs().mean())
    return total


def grads(module, loss):
    module.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


TERM_CASES = {
    "adversarial only": dict(lambda_adv=1.0, lambda_cycle=0.0, lambda_identity=0.0),
    "no adversarial": dict(lambda_adv=0.0, lambda_cycle=10.0, lambda_identity=0.5),
    "cycle only": dict(lambda_adv=0.0, lambda_cycle=10.0, lambda_identity=0.0),
    "no cycle (lambda_cycle=0)": dict(lambda_adv=1.0, lambda_cycle=0.0, lambda_identity=0.5),
    "identity on": dict(lambda_adv=1.0, lambda_cycle=10.0, lambda_identity=0.5),
    "identity off": dict(lambda_adv=1.0, lambda_cycle=10.0, lambda_identity=0.0),
    "preserve only": dict(lambda_adv=0.0, lambda_cycle=0.0, lambda_identity=0.0, lambda_preserve=0.5),
    "feature only": dict(lambda_adv=0.0, lambda_cycle=0.0, lambda_identity=0.0, lambda_feature=2.0),
    "all zero": dict(lambda_adv=0.0, lambda_cycle=0.0, lambda_identity=0.0),
}


@pytest.mark.parametrize("case", sorted(TERM_CASES))
def test_each_loss_term_reaches_gradients_only_through_its_weight(case):
    gens, discs, cfg = small_units("hnet", **TERM_CASES[case])
    discs.requires_grad_(False)
    x, y = batch()
    loss, stats, _ = generator_step(gens, discs, x, y, cfg)
    got = grads(gens, loss)
    want = grads(gens, expected_loss(gens, discs, x, y, cfg))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    nonzero = any(g.abs().sum() > 0 for g in got)
    assert nonzero == (case != "all zero")
    assert ("loss/idt_x" in stats) == (cfg.lambda_identity > 0)
    assert ("loss/feature_x" in stats) == (cfg.lambda_feature > 0)


def test_identity_forward_is_skipped_when_its_weight_is_zero():
    gens, _, _ = small_units(lambda_identity=0.0)
    out = gens(*batch())
    assert "idt_x" not in out and "idt_y" not in out


def test_gan_objectives_on_known_scores():
    ones, zeros = torch.ones(4), torch.zeros(4)
    assert discriminator_loss(ones, zeros, "lsgan")[0].item() == 0.0
    assert discriminator_loss(zeros, ones, "lsgan")[0].item() == 1.0
    assert discriminator_loss(2 * ones, -2 * ones, "hinge")[0].item() == 0.0
    assert discriminator_loss(zeros, zeros, "hinge")[0].item() == 1.0
    assert discriminator_loss(zeros, zeros, "vanilla")[0].item() == pytest.approx(math.log(2))
    assert generator_adv_loss(ones, "lsgan").item() == 0.0
    assert generator_adv_loss(3 * ones, "hinge").item() == -3.0
    logits = torch.tensor([0.3, -1.2])
    assert generator_adv_loss(logits, "vanilla").item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, torch.ones(2)).item()
    )
