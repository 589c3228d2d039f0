"""The baseline of the throughput benchmark: one CycleGAN training step the way the reference implementation
(pytorch-CycleGAN-and-pix2pix) takes it - one process, fp32, batch 1, one Adam over both generators and one over
both discriminators with per-tensor (for-loop) updates, each discriminator's loss backpropagated on its own - on
the same networks as ours (built by trainer.models), so the ratio measures the training path, not the model.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.algorithms.pool import ImagePool
from trainer.config.model import LossConfig, ModelConfig
from trainer.models import build_discriminator, build_generator


def _lsgan(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    return F.mse_loss(prediction, torch.full_like(prediction, 1.0 if real else 0.0))


class ReferenceStep:
    """G_A: A->B, G_B: B->A, D_A judges B, D_B judges A (the reference's naming); call with a batch of A and B."""

    def __init__(self, model: ModelConfig, loss: LossConfig, lr: float = 2e-4, device: str = "cpu") -> None:
        self.g_a, self.g_b = build_generator(model).to(device), build_generator(model).to(device)
        self.d_a, self.d_b = build_discriminator(model).to(device), build_discriminator(model).to(device)
        gens = itertools.chain(self.g_a.parameters(), self.g_b.parameters())
        discs = itertools.chain(self.d_a.parameters(), self.d_b.parameters())
        self.opt_g = torch.optim.Adam(gens, lr=lr, betas=(0.5, 0.999), foreach=False)
        self.opt_d = torch.optim.Adam(discs, lr=lr, betas=(0.5, 0.999), foreach=False)
        self.pool_a, self.pool_b = ImagePool(50, seed=0), ImagePool(50, seed=1)
        self.lambda_cycle, self.lambda_idt = loss.lambda_cycle, loss.lambda_cycle * loss.lambda_identity

    def _set_requires_grad(self, nets: tuple[nn.Module, ...], flag: bool) -> None:
        for net in nets:
            for p in net.parameters():
                p.requires_grad = flag

    def __call__(self, real_a: torch.Tensor, real_b: torch.Tensor) -> None:
        fake_b, fake_a = self.g_a(real_a), self.g_b(real_b)
        rec_a, rec_b = self.g_b(fake_b), self.g_a(fake_a)
        self._set_requires_grad((self.d_a, self.d_b), False)
        self.opt_g.zero_grad()
        idt_a, idt_b = self.g_a(real_b), self.g_b(real_a)
        loss_g = (
            _lsgan(self.d_a(fake_b), True)
            + _lsgan(self.d_b(fake_a), True)
            + self.lambda_cycle * (F.l1_loss(rec_a, real_a) + F.l1_loss(rec_b, real_b))
            + self.lambda_idt * (F.l1_loss(idt_a, real_b) + F.l1_loss(idt_b, real_a))
        )
        loss_g.backward()
        self.opt_g.step()
        self._set_requires_grad((self.d_a, self.d_b), True)
        self.opt_d.zero_grad()
        for disc, real, fake in ((self.d_a, real_b, self.pool_b.query(fake_b.detach())),
                                 (self.d_b, real_a, self.pool_a.query(fake_a.detach()))):  # fmt: skip
            loss_d = 0.5 * (_lsgan(disc(real), True) + _lsgan(disc(fake.detach()), False))
            loss_d.backward()
        self.opt_d.step()
