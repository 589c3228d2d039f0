"""Adversarial objectives (lsgan, vanilla, hinge) and the L1 terms of CycleGAN. Losses are computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def generator_adv_loss(pred_fake: torch.Tensor, gan_mode: str) -> torch.Tensor:
    """The generator's adversarial loss on discriminator scores of its fakes (Eq. 1 of the paper, G's side)."""
    pred_fake = pred_fake.float()
    if gan_mode == "lsgan":
        return F.mse_loss(pred_fake, torch.ones_like(pred_fake))
    if gan_mode == "vanilla":
        return F.binary_cross_entropy_with_logits(pred_fake, torch.ones_like(pred_fake))
    if gan_mode == "hinge":
        return -pred_fake.mean()
    raise ValueError(f"unknown gan_mode {gan_mode!r}")


def discriminator_loss(pred_real: torch.Tensor, pred_fake: torch.Tensor, gan_mode: str) -> tuple[torch.Tensor, ...]:
    """The discriminator's loss, halved as in the reference to slow D relative to G.

    Returns:
        (loss, real_part, fake_part) with loss = 0.5 * (real_part + fake_part).
    """
    pred_real, pred_fake = pred_real.float(), pred_fake.float()
    if gan_mode == "lsgan":
        real = F.mse_loss(pred_real, torch.ones_like(pred_real))
        fake = F.mse_loss(pred_fake, torch.zeros_like(pred_fake))
    elif gan_mode == "vanilla":
        real = F.binary_cross_entropy_with_logits(pred_real, torch.ones_like(pred_real))
        fake = F.binary_cross_entropy_with_logits(pred_fake, torch.zeros_like(pred_fake))
    elif gan_mode == "hinge":
        real = F.relu(1.0 - pred_real).mean()
        fake = F.relu(1.0 + pred_fake).mean()
    else:
        raise ValueError(f"unknown gan_mode {gan_mode!r}")
    return 0.5 * (real + fake), real, fake


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in fp32."""
    return F.l1_loss(a.float(), b.float())
