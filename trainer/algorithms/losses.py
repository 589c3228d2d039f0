"""Adversarial objectives (lsgan, vanilla, hinge, wgangp) with WGAN-GP's gradient penalty, the L1 terms of CycleGAN
and CUT's PatchNCE loss. Losses are computed in fp32."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def generator_adv_loss(pred_fake: torch.Tensor, gan_mode: str) -> torch.Tensor:
    """The generator's adversarial loss on discriminator scores of its fakes (Eq. 1 of the paper, G's side)."""
    pred_fake = pred_fake.float()
    if gan_mode == "lsgan":
        return F.mse_loss(pred_fake, torch.ones_like(pred_fake))
    if gan_mode == "vanilla":
        return F.binary_cross_entropy_with_logits(pred_fake, torch.ones_like(pred_fake))
    if gan_mode in ("hinge", "wgangp"):
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
    elif gan_mode == "wgangp":  # the critic's Wasserstein estimate; the penalty is added by the step
        real = -pred_real.mean()
        fake = pred_fake.mean()
    else:
        raise ValueError(f"unknown gan_mode {gan_mode!r}")
    return 0.5 * (real + fake), real, fake


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute error in fp32."""
    return F.l1_loss(a.float(), b.float())


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor
) -> torch.Tensor:
    """WGAN-GP's penalty (Gulrajani et al., 2017): mean over images of (||grad critic(m)||_2 - 1)^2 at
    m = a * real + (1 - a) * fake, one a ~ U(0, 1) per image (drawn from the global CPU RNG, which checkpoints
    hold). The gradient keeps its graph (create_graph), so the penalty's backward differentiates the critic twice.
    """
    alpha = torch.rand(real.shape[0], 1, 1, 1).to(device=real.device, dtype=real.dtype)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).float().sum(), mixed, create_graph=True)
    return ((grad.float().flatten(1) + 1e-16).norm(2, dim=1) - 1.0).square().mean()


def patch_nce_loss(query: torch.Tensor, key: torch.Tensor, images: int, temperature: float) -> torch.Tensor:
    """PatchNCE (Park et al., 2020, Eq. 2): each query patch must pick its key patch - the same location of the
    input image - among the keys of all sampled locations of the same image (the negatives).

    Args:
        query: [images * P, C] L2-normalized projections of the output's patches (gradients flow into them).
        key: [images * P, C] projections of the input's patches at the same locations (detached here).
        images: how many images the rows come from (P rows each, in order).
        temperature: tau of the softmax.

    Returns:
        The cross-entropy averaged over all query patches.
    """
    query, key = query.float(), key.detach().float()
    dim = query.shape[1]
    positive = (query * key).sum(dim=1, keepdim=True)  # [images * P, 1]
    q, k = query.view(images, -1, dim), key.view(images, -1, dim)
    negatives = torch.bmm(q, k.transpose(1, 2))  # [images, P, P]; the diagonal holds the positives
    patches = q.shape[1]
    eye = torch.eye(patches, dtype=torch.bool, device=query.device)[None]
    negatives = negatives.masked_fill(eye, -10.0).flatten(0, 1)  # as the reference: exp(-10 / tau) ~ 0
    logits = torch.cat([positive, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=query.device))
