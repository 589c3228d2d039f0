"""The CycleGAN algorithm (Zhu et al., 2017), free of any distributed or tracking code (CUT's is cut.py, with the
same step functions: see family.py).

Names follow the paper and the source article: g_xy is the paper's G (X -> Y), g_yx is its F (Y -> X); d_x tells
real x from g_yx(y), d_y tells real y from g_xy(x). The generators form one trainable unit (`GeneratorPair`), the
discriminators the other (`DiscriminatorPair`); each unit's `forward` does all of that unit's work for its step,
so a distributed wrapper sees exactly one forward per backward. The step functions return losses and never call
backward() or step(): the engine does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.algorithms.losses import generator_adv_loss, gradient_penalty, l1
from trainer.algorithms.shared import Tensors, discriminator_terms, one_call, with_extra
from trainer.config.model import LossConfig, ModelConfig
from trainer.models import build_discriminator, build_generator, build_hnet


class GeneratorPair(nn.Module):
    """g_xy and g_yx; `forward` runs the translations, reconstructions and (if used) identity mappings.

    With `fuse_passes`, each generator's translation and identity passes (g_xy(x) and g_xy(y), g_yx(y) and
    g_yx(x)) run as one call on the two batches concatenated: 4 generator calls instead of 6, with larger kernels.
    Per-sample normalization (instance norm, none) makes that the same math; batch norm would not (the config
    refuses the combination).
    """

    def __init__(self, g_xy: nn.Module, g_yx: nn.Module, use_identity: bool, fuse_passes: bool = False):
        super().__init__()
        self.g_xy = g_xy
        self.g_yx = g_yx
        self.use_identity = use_identity
        self.fuse_passes = fuse_passes and use_identity

    def forward(
        self,
        real_x: torch.Tensor,
        real_y: torch.Tensor,
        extra_x: torch.Tensor | None = None,
        extra_y: torch.Tensor | None = None,
    ) -> Tensors:  # images [N, 3, H, W]; extras [N, C, H, W] or None
        # A scene's extras (label map, colour histogram) describe it on both sides of a translation, so x's
        # extras go with every generator input derived from x, and y's with those derived from y.
        in_x, in_y = with_extra(real_x, extra_x), with_extra(real_y, extra_y)
        out = {}
        if self.fuse_passes:
            out["fake_y"], out["idt_y"] = one_call(self.g_xy, in_x, in_y)
            out["idt_x"], out["fake_x"] = one_call(self.g_yx, in_x, in_y)
        else:
            out["fake_y"], out["fake_x"] = self.g_xy(in_x), self.g_yx(in_y)
            if self.use_identity:
                out["idt_x"] = self.g_yx(in_x)  # F should leave an X image as it is
                out["idt_y"] = self.g_xy(in_y)
        out["rec_x"] = self.g_yx(with_extra(out["fake_y"], extra_x))
        out["rec_y"] = self.g_xy(with_extra(out["fake_x"], extra_y))
        return out

    def sample_columns(
        self, x: torch.Tensor, y: torch.Tensor, extra_x: torch.Tensor | None, extra_y: torch.Tensor | None
    ) -> dict[str, list[torch.Tensor]]:
        """The sample grids' columns: x | G(x) | F(G(x)) and y | F(y) | G(F(y))."""
        out = self(x, y, extra_x, extra_y)
        return {"x_to_y": [x, out["fake_y"], out["rec_x"]], "y_to_x": [y, out["fake_x"], out["rec_y"]]}


class DiscriminatorPair(nn.Module):
    """d_x and d_y. For the article's H/H' variant both share `trunk` (H): d_x = H'_X(H(.)), d_y = H'_Y(H(.)).
    With `penalty` (loss.gan_mode=wgangp) the forward also computes each one's gradient penalty, so the unit's
    one forward holds all of its step's work."""

    def __init__(self, d_x: nn.Module, d_y: nn.Module, trunk: nn.Module | None = None, penalty: bool = False):
        super().__init__()
        self.d_x = d_x
        self.d_y = d_y
        self.trunk = trunk
        self.penalty = penalty

    def forward(
        self, real_x: torch.Tensor, fake_x: torch.Tensor, real_y: torch.Tensor, fake_y: torch.Tensor
    ) -> Tensors:
        out = {
            "real_x": self.d_x(real_x),
            "fake_x": self.d_x(fake_x),
            "real_y": self.d_y(real_y),
            "fake_y": self.d_y(fake_y),
        }
        if self.penalty and torch.is_grad_enabled():
            out["gp_x"] = gradient_penalty(self.d_x, real_x, fake_x)
            out["gp_y"] = gradient_penalty(self.d_y, real_y, fake_y)
        return out

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """H(images): the shared trunk's features (only for the H/H' variant)."""
        if self.trunk is None:
            raise ValueError("feature-level cycle loss needs model.discriminator=hnet")
        return self.trunk(images)


def build_units(
    model_cfg: ModelConfig, loss_cfg: LossConfig, fuse_passes: bool = False
) -> tuple[GeneratorPair, DiscriminatorPair]:
    """The two trainable units, initialized from the global torch RNG (seed it first for identical ranks)."""
    g_xy, g_yx = build_generator(model_cfg, "x", "y"), build_generator(model_cfg, "y", "x")
    gens = GeneratorPair(g_xy, g_yx, loss_cfg.lambda_identity > 0, fuse_passes)
    penalty = loss_cfg.gan_mode == "wgangp"
    if model_cfg.discriminator == "hnet":
        trunk, head_x, head_y = build_hnet(model_cfg)
        discs = DiscriminatorPair(nn.Sequential(trunk, head_x), nn.Sequential(trunk, head_y), trunk, penalty)
    else:
        d_x, d_y = build_discriminator(model_cfg, "x"), build_discriminator(model_cfg, "y")
        discs = DiscriminatorPair(d_x, d_y, penalty=penalty)
    return gens, discs


def generator_step(
    gens: nn.Module,
    discs: DiscriminatorPair,
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    cfg: LossConfig,
    extra_x: torch.Tensor | None = None,
    extra_y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Tensors, Tensors]:
    """The generator objective (Eq. 3 of the paper plus identity and the article's optional terms).

    `discs` must be the plain (unwrapped) discriminator pair with requires_grad off: it only scores the fakes.
    `extra_x`/`extra_y` are optional extra generator input channels (data.extra).

    Returns:
        (loss, stats, outputs): the scalar loss, detached per-term values keyed `loss/...`, and the generator
        outputs (fake_x, fake_y, ...) for the discriminator step and the sample grids.
    """
    out = gens(real_x, real_y, extra_x, extra_y)
    terms = {
        # Eq. 1, generator side: g_xy wants d_y to call its fakes real, and g_yx likewise for d_x.
        "adv_g_xy": generator_adv_loss(discs.d_y(out["fake_y"]), cfg.gan_mode),
        "adv_g_yx": generator_adv_loss(discs.d_x(out["fake_x"]), cfg.gan_mode),
        # Eq. 2: ||g_yx(g_xy(x)) - x||_1 and ||g_xy(g_yx(y)) - y||_1
        "cycle_x": l1(out["rec_x"], real_x),
        "cycle_y": l1(out["rec_y"], real_y),
    }
    loss = cfg.lambda_adv * (terms["adv_g_xy"] + terms["adv_g_yx"])
    loss = loss + cfg.lambda_cycle * (terms["cycle_x"] + terms["cycle_y"])
    if cfg.lambda_identity > 0:
        # Identity (Sec. 5.2 of the paper): ||g_yx(x) - x||_1 + ||g_xy(y) - y||_1
        terms["idt_x"] = l1(out["idt_x"], real_x)
        terms["idt_y"] = l1(out["idt_y"], real_y)
        loss = loss + cfg.lambda_cycle * cfg.lambda_identity * (terms["idt_x"] + terms["idt_y"])
    if cfg.lambda_preserve > 0:
        # The article's input preservation: ||g_xy(x) - x||_1 + ||g_yx(y) - y||_1
        terms["preserve_x"] = l1(out["fake_y"], real_x)
        terms["preserve_y"] = l1(out["fake_x"], real_y)
        loss = loss + cfg.lambda_preserve * (terms["preserve_x"] + terms["preserve_y"])
    if cfg.lambda_feature > 0:
        # The article's feature-level cycle loss through the frozen trunk: ||H(F(G(x))) - H(x)||_1 + ...
        terms["feature_x"] = l1(discs.features(out["rec_x"]), discs.features(real_x))
        terms["feature_y"] = l1(discs.features(out["rec_y"]), discs.features(real_y))
        loss = loss + cfg.lambda_feature * (terms["feature_x"] + terms["feature_y"])
    stats = {f"loss/{name}": value.detach() for name, value in terms.items()}
    stats["loss/g_total"] = loss.detach()
    return loss, stats, out


def discriminator_step(
    discs: nn.Module,
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    fake_x: torch.Tensor,
    fake_y: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, Tensors]:
    """The discriminators' objective on real images vs (pooled, detached) fakes.

    Returns:
        (loss, stats): loss = loss_d_x + loss_d_y, each with 0.5 * lambda_gp times its penalty under wgangp,
        and detached per-term values keyed `loss/...`.
    """
    preds = discs(real_x, fake_x.detach(), real_y, fake_y.detach())
    stats: Tensors = {}
    for domain in ("x", "y"):
        stats.update(discriminator_terms(preds, domain, cfg))
    stats["loss/d_total"] = stats["loss/d_x"] + stats["loss/d_y"]
    return stats["loss/d_total"], {key: value.detach() for key, value in stats.items()}
