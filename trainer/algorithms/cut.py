"""CUT and FastCUT (Park et al., "Contrastive Learning for Unpaired Image-to-Image Translation", ECCV 2020), free
of any distributed or tracking code, with the same step functions as cyclegan.py.

One generator G = g_xy (X -> Y) and one discriminator d_y. Instead of a second generator and cycle consistency, G's
own encoder keeps the content: a patch of G(x) must be recognised, among the other patches of the same image, as
coming from the same location of x (PatchNCE). The generator unit (`ContrastiveGenerator`) holds G and the PatchNCE
head, built eagerly from the config, so every backend wraps and shards a complete module; its `forward` runs all
of G's passes and the head for one step, so a distributed wrapper sees one forward per backward. The
discriminator unit (`SingleDiscriminator`) holds d_y. Randomness (patch locations, the FastCUT flip) comes from the
global CPU RNG, which checkpoints hold per rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from trainer.algorithms.losses import generator_adv_loss, gradient_penalty, patch_nce_loss
from trainer.algorithms.shared import Tensors, discriminator_terms, one_call, with_extra
from trainer.config.model import LossConfig, ModelConfig
from trainer.models import build_discriminator, build_generator
from trainer.models.layers import init_weights

Pairs = list[tuple[torch.Tensor, torch.Tensor]]  # per NCE layer: (query, key) projections, [N * P, C] each


class PatchHead(nn.Module):
    """PatchNCE's projection head: for each NCE layer a two-layer MLP (Linear, ReLU, Linear) from that layer's
    width to `channels`, its outputs L2-normalized. The reference builds it inside the first forward, which no
    distributed wrapper sees; here its widths come from the generator's layer shapes."""

    def __init__(self, widths: list[int], channels: int):
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(width, channels), nn.ReLU(), nn.Linear(channels, channels)) for width in widths
        )

    def forward(self, features: list[torch.Tensor], locations: list[torch.Tensor]) -> list[torch.Tensor]:
        """Project each layer's features [N, C, H, W] at the flat locations [P] (the same for every image) to
        [N * P, channels] unit vectors, image by image."""
        out = []
        for mlp, feature, where in zip(self.mlps, features, locations):
            rows = feature.flatten(2).transpose(1, 2)[:, where].flatten(0, 1)  # [N * P, C]
            projected = mlp(rows).float()
            out.append(projected / (projected.norm(dim=1, keepdim=True) + 1e-7))  # as the reference normalizes
        return out


class ContrastiveGenerator(nn.Module):
    """G and the PatchNCE head. `forward` translates x (and y, for the identity NCE term) and returns the (query,
    key) projections PatchNCE compares: keys from G's features of the input, queries from G's features of the
    output at the same sampled locations."""

    g_yx = None  # no generator Y -> X: evaluation, translate and export see one direction

    def __init__(
        self,
        g_xy: nn.Module,
        head: PatchHead,
        layers: list[int],
        patches: int,
        use_identity: bool,
        flip_equivariance: bool,
        fuse_passes: bool = False,
    ):
        super().__init__()
        self.g_xy = g_xy
        self.head = head
        self.layers, self.patches = layers, patches
        self.use_identity, self.flip_equivariance = use_identity, flip_equivariance
        self.fuse_passes = fuse_passes and use_identity

    def forward(
        self,
        real_x: torch.Tensor,
        real_y: torch.Tensor,
        extra_x: torch.Tensor | None = None,
        extra_y: torch.Tensor | None = None,
    ) -> dict:  # images [N, 3, H, W]; extras [N, C, H, W] or None
        in_x, in_y = with_extra(real_x, extra_x), with_extra(real_y, extra_y)
        # FastCUT's flip-equivariance: G translates the mirrored batch (extras included); its features of that
        # translation, mirrored back, must match those of the input as it is.
        flipped = self.training and self.flip_equivariance and bool(torch.rand(()) < 0.5)
        g_in_x, g_in_y, g_extra_x, g_extra_y = (mirrored(t, flipped) for t in (in_x, in_y, extra_x, extra_y))
        if self.fuse_passes:
            fake_y, idt_y = one_call(self.g_xy, g_in_x, g_in_y)
        else:
            fake_y = self.g_xy(g_in_x)
            idt_y = self.g_xy(g_in_y) if self.use_identity else None
        out: dict = {"nce_x": self._pairs(in_x, with_extra(fake_y, g_extra_x), flipped)}
        if self.use_identity:
            out["nce_y"] = self._pairs(in_y, with_extra(idt_y, g_extra_y), flipped)
        # As the reference, D scores the translation as G made it (mirrored on a flipped step): scoring it mirrored
        # back, FastCUT's demo stalled at +3 dB instead of +11 dB (README, Performance)
        out["fake_y"] = fake_y
        if self.use_identity:
            out["idt_y"] = idt_y
        return out

    def _pairs(self, source: torch.Tensor, output: torch.Tensor, flipped: bool) -> Pairs:
        """(query, key) projections per NCE layer: keys from G's features of `source`, queries from those of
        `output` (G's translation with the extras, both mirrored when the batch was flipped; its features are
        mirrored back) at the same random locations."""
        with torch.no_grad():  # PatchNCE detaches the keys: no graph for them
            key_features = self.g_xy.features(source, self.layers)
        locations = [torch.randperm(f.shape[2] * f.shape[3])[: self.patches].to(f.device) for f in key_features]
        with torch.no_grad():
            keys = self.head(key_features, locations)
        query_features = self.g_xy.features(output, self.layers)
        if flipped:
            query_features = [feature.flip(3) for feature in query_features]
        return list(zip(self.head(query_features, locations), keys))

    def sample_columns(
        self, x: torch.Tensor, y: torch.Tensor, extra_x: torch.Tensor | None, extra_y: torch.Tensor | None
    ) -> dict[str, list[torch.Tensor]]:
        """The sample grids' columns: x | G(x), and y | G(y) (the identity G should leave as it is) where X and Y
        have one channel count."""
        columns = {"x_to_y": [x, self.g_xy(with_extra(x, extra_x))]}
        if y.shape[1] == x.shape[1]:
            columns["y_identity"] = [y, self.g_xy(with_extra(y, extra_y))]
        return columns


def mirrored(images: torch.Tensor | None, flipped: bool) -> torch.Tensor | None:
    """`images` mirrored left-right when `flipped` (None stays None)."""
    return images.flip(3) if flipped and images is not None else images


class SingleDiscriminator(nn.Module):
    """d_y, telling real y from G(x); with loss.gan_mode=wgangp its forward also computes the gradient penalty."""

    def __init__(self, d_y: nn.Module, penalty: bool = False):
        super().__init__()
        self.d_y = d_y
        self.penalty = penalty

    def forward(self, real_y: torch.Tensor, fake_y: torch.Tensor) -> Tensors:
        out = {"real_y": self.d_y(real_y), "fake_y": self.d_y(fake_y)}
        if self.penalty and torch.is_grad_enabled():
            out["gp_y"] = gradient_penalty(self.d_y, real_y, fake_y)
        return out


def build_units(
    model_cfg: ModelConfig, loss_cfg: LossConfig, fuse_passes: bool = False
) -> tuple[ContrastiveGenerator, SingleDiscriminator]:
    """The two trainable units, initialized from the global torch RNG (seed it first for identical ranks)."""
    g_xy = build_generator(model_cfg)
    head = PatchHead(g_xy.feature_widths(model_cfg.nce_layers), model_cfg.nce_mlp_channels)
    init_weights(head, model_cfg.init, model_cfg.init_gain)
    gens = ContrastiveGenerator(
        g_xy,
        head,
        model_cfg.nce_layers,
        model_cfg.nce_patches,
        model_cfg.nce_identity,
        model_cfg.flip_equivariance,
        fuse_passes,
    )
    return gens, SingleDiscriminator(build_discriminator(model_cfg, "y"), loss_cfg.gan_mode == "wgangp")


def nce_loss(pairs: Pairs, images: int, temperature: float) -> torch.Tensor:
    """PatchNCE averaged over the NCE layers (the paper's Eq. 5 for one image set)."""
    return sum(patch_nce_loss(query, key, images, temperature) for query, key in pairs) / len(pairs)


def generator_step(
    gens: nn.Module,
    discs: SingleDiscriminator,
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    cfg: LossConfig,
    extra_x: torch.Tensor | None = None,
    extra_y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Tensors, dict]:
    """The generator objective: lambda_adv * GAN(G) + lambda_nce * PatchNCE(x, G(x)), the NCE term averaged with
    PatchNCE(y, G(y)) when the identity term is on (the paper's Eq. 5).

    `discs` must be the plain (unwrapped) discriminator with requires_grad off: it only scores the fakes.

    Returns:
        (loss, stats, outputs): as cyclegan.generator_step; the outputs hold fake_y (and idt_y).
    """
    out = gens(real_x, real_y, extra_x, extra_y)
    terms = {
        "adv_g_xy": generator_adv_loss(discs.d_y(out["fake_y"]), cfg.gan_mode),
        "nce_x": nce_loss(out.pop("nce_x"), len(real_x), cfg.nce_temperature),
    }
    nce = terms["nce_x"]
    if "nce_y" in out:
        terms["nce_y"] = nce_loss(out.pop("nce_y"), len(real_y), cfg.nce_temperature)
        nce = 0.5 * (nce + terms["nce_y"])
    loss = cfg.lambda_adv * terms["adv_g_xy"] + cfg.lambda_nce * nce
    stats = {f"loss/{name}": value.detach() for name, value in terms.items()}
    stats["loss/g_total"] = loss.detach()
    return loss, stats, out


def discriminator_step(
    discs: nn.Module,
    real_x: torch.Tensor,
    real_y: torch.Tensor,
    fake_x: torch.Tensor | None,
    fake_y: torch.Tensor,
    cfg: LossConfig,
) -> tuple[torch.Tensor, Tensors]:
    """d_y's objective on real y vs (detached) G(x); real_x and fake_x are CycleGAN's and unused.

    Returns:
        (loss, stats): loss = loss_d_y (+ 0.5 * lambda_gp * gp_y under wgangp) and detached per-term values.
    """
    stats = discriminator_terms(discs(real_y, fake_y.detach()), "y", cfg)  # CycleGAN's d_y, without a pool
    stats["loss/d_total"] = loss = stats["loss/d_y"]
    return loss, {key: value.detach() for key, value in stats.items()}
