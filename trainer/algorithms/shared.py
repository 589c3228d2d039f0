"""What the model families share: the input with its extra channels, one call for two batches, and a
discriminator's loss terms."""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.algorithms.losses import discriminator_loss
from trainer.config.model import LossConfig

Tensors = dict[str, torch.Tensor]


def one_call(net: nn.Module, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(net(a), net(b)) from one call on the two batches concatenated (train.fuse_generator_passes; the same math
    with per-sample normalization)."""
    first, second = net(torch.cat([a, b])).split([len(a), len(b)])
    return first, second


def with_extra(images: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    """Generator input: the images, followed by the extra channels when there are any."""
    return images if extra is None else torch.cat([images, extra.to(images.dtype)], dim=1)


def discriminator_terms(preds: Tensors, domain: str, cfg: LossConfig) -> Tensors:
    """The loss of the discriminator of `domain` (x or y) from its scores in `preds` (real_D, fake_D and, under
    wgangp, its penalty gp_D), keyed `loss/d_D`, with its parts: d_D_real, d_D_fake, gp_D."""
    loss, real_part, fake_part = discriminator_loss(preds[f"real_{domain}"], preds[f"fake_{domain}"], cfg.gan_mode)
    terms = {f"loss/d_{domain}_real": real_part, f"loss/d_{domain}_fake": fake_part}
    if f"gp_{domain}" in preds:
        terms[f"loss/gp_{domain}"] = preds[f"gp_{domain}"]
        loss = loss + 0.5 * cfg.lambda_gp * preds[f"gp_{domain}"]  # halved with the rest (see LossConfig)
    terms[f"loss/d_{domain}"] = loss
    return terms
