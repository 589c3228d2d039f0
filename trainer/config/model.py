"""The model and loss sections: the units' architecture (model.*) and the loss weights and GAN objective (loss.*)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from trainer.config.checks import ConfigError, refuse_unused, require
from trainer.config.generators import GENERATOR_FACTS, generators_where

GeneratorName = Literal[tuple(GENERATOR_FACTS)]  # type: ignore[valid-type]  # the names of the one table

DiscriminatorName = Literal["patchgan", "pixel", "hnet"]

NormName = Literal["batch", "instance", "none"]

FamilyName = Literal["cyclegan", "cut", "fastcut"]

CONTRASTIVE_FAMILIES = ("cut", "fastcut")
"""Families trained with PatchNCE (trainer/algorithms/cut.py): one generator X -> Y and one discriminator."""


NCE_MODEL_FIELDS = ("nce_layers", "nce_patches", "nce_mlp_channels", "nce_identity", "flip_equivariance")
"""The model fields only CUT/FastCUT use."""

MAX_CHANNELS = 64
"""Most image channels (bands) of a domain (shards.pixels.MAX_CHANNELS)."""

TRAINING_MODEL_FIELDS = ("nce_patches", "nce_identity", "flip_equivariance")
"""Model fields that change how the units train, not their weights: a resumed run may change them."""


@dataclass(kw_only=True)
class ModelConfig:
    """The model family and the units' architecture: generators, discriminators, norms, init, CUT's PatchNCE."""

    family: FamilyName = "cyclegan"
    """cyclegan: two generators and two discriminators with cycle consistency (Zhu et al., 2017). cut / fastcut:
    one generator X -> Y, one discriminator and a PatchNCE head (Park et al., 2020); fastcut is CUT without the
    identity NCE term, with lambda_nce 10 and flip-equivariance augmentation."""
    generator: GeneratorName = "resnet_9blocks"
    """Generator architecture of g_xy (the paper's G) and, for CycleGAN, g_yx (the paper's F)."""
    discriminator: DiscriminatorName = "patchgan"
    """patchgan (70x70 PatchGAN), pixel (1x1 PatchGAN) or hnet (shared trunk H with heads H'_X, H'_Y)."""
    ngf: int = 64
    """Filters in the generators' first layer."""
    ndf: int = 64
    """Filters in the discriminators' first layer."""
    n_layers_d: int = 3
    """Strided conv layers of the PatchGAN (3 gives the 70x70 receptive field)."""
    n_blocks: int | None = None
    """Residual blocks of resnet (default 9), dense blocks of densenet (default 3); resnet_6blocks/_9blocks fix it."""
    n_skip: int = 2
    """Encoder/decoder levels of the article's U-Net (unet_article)."""
    norm_g: NormName = "instance"
    """Normalization in the generators."""
    norm_d: NormName = "instance"
    """Normalization in the discriminators."""
    use_dropout: bool = False
    """Dropout(0.5) in the ResNet blocks and the U-Net decoders."""
    init: Literal["normal", "xavier", "kaiming", "orthogonal"] = "normal"
    """Weight initialization; normal is N(0, init_gain) as in the reference implementation."""
    init_gain: float = 0.02
    """Std of the normal init, gain of xavier/orthogonal."""
    hnet_trunk_layers: int = 2
    """For discriminator=hnet: PatchGAN stages in the shared trunk H; the rest form each head H'."""
    x_channels: int | None = None
    """Channels of domain X's images: 1 grey, 3 RGB, 4 RGBA or N bands. Null: the data's (its manifest records
    them; 3 for shards without one). A value the data contradicts is an error."""
    y_channels: int | None = None
    """Channels of domain Y's images (see x_channels). G maps X's channels to Y's, F back, D_X and D_Y take their
    domain's; the identity loss needs both the same and is off otherwise."""
    input_nc: int | None = None
    """Input channels of G: x_channels plus the channels of data.extra (set from them when null)."""
    nce_layers: list[int] | None = None
    """CUT/FastCUT: the generator layers whose features PatchNCE compares, as indices into the ResNet's layer stack
    (0: the padded input, 4 and 7: the two downsamplings, 10 + i: residual block i). Null: the paper's choice,
    [0, 4, 7, 10, 14] (input, both downsamplings, the 1st and 5th block), keeping those the generator has."""
    nce_patches: int = 256
    """CUT/FastCUT: patch locations sampled per layer and image (all of a layer's locations when it has fewer)."""
    nce_mlp_channels: int = 256
    """CUT/FastCUT: width of the PatchNCE head (a two-layer MLP per layer; its output is L2-normalized)."""
    nce_identity: bool | None = None
    """CUT/FastCUT: also apply PatchNCE to G(y) against y (the identity NCE term). Null: on for cut, off for fastcut."""
    flip_equivariance: bool | None = None
    """CUT/FastCUT: flip each training batch horizontally with probability 0.5 before G and compare G's features of
    the flipped translation, flipped back, with those of the input. Null: on for fastcut, off for cut."""

    def __post_init__(self) -> None:
        require(self.ngf >= 1, "model.ngf", self.ngf, "an integer >= 1")
        require(self.ndf >= 1, "model.ndf", self.ndf, "an integer >= 1")
        require(self.n_layers_d >= 1, "model.n_layers_d", self.n_layers_d, "an integer >= 1")
        facts = GENERATOR_FACTS[self.generator]
        fixed = facts.fixed_blocks
        if fixed is not None and self.n_blocks not in (None, fixed):
            raise ConfigError(
                f"model.n_blocks={self.n_blocks} contradicts model.generator={self.generator}; "
                "use model.generator=resnet to choose the block count"
            )
        if self.n_blocks is None:
            self.n_blocks = facts.default_blocks
        require(self.n_blocks >= 1, "model.n_blocks", self.n_blocks, "an integer >= 1")
        require(1 <= self.n_skip <= 6, "model.n_skip", self.n_skip, "an integer in [1, 6]")
        require(self.init_gain > 0, "model.init_gain", self.init_gain, "a number > 0")
        for key in ("x_channels", "y_channels"):
            value = getattr(self, key)
            if value is not None:
                require(1 <= value <= MAX_CHANNELS, f"model.{key}", value, f"an integer in [1, {MAX_CHANNELS}] or null")
        max_trunk = self.n_layers_d + 1
        require(
            1 <= self.hnet_trunk_layers <= max_trunk,
            "model.hnet_trunk_layers",
            self.hnet_trunk_layers,
            f"an integer in [1, {max_trunk}] (n_layers_d + 1)",
        )
        if self.family in CONTRASTIVE_FAMILIES:
            self._resolve_nce()
        else:
            refuse_unused(self, "model.", NCE_MODEL_FIELDS, self.family)

    def _resolve_nce(self) -> None:
        """Check the CUT/FastCUT fields and fill in the family's defaults."""
        layers = GENERATOR_FACTS[self.generator].feature_layers
        if layers is None:
            readable = ", ".join(generators_where(lambda facts: facts.feature_layers))
            raise ConfigError(
                f"model.family={self.family} needs a ResNet generator ({readable}), got "
                f"model.generator={self.generator}: PatchNCE reads the features of its encoder layers"
            )
        if self.discriminator == "hnet":
            raise ConfigError(
                f"model.family={self.family} trains one discriminator; model.discriminator=hnet is CycleGAN's pair "
                "with a shared trunk: use patchgan or pixel"
            )
        depth = layers(self)
        if self.nce_layers is None:
            self.nce_layers = [layer for layer in (0, 4, 7, 10, 14) if layer < depth]
        require(
            bool(self.nce_layers) and all(0 <= layer < depth for layer in self.nce_layers),
            "model.nce_layers",
            self.nce_layers,
            f"a non-empty list of layer indices in [0, {depth - 1}] for this generator",
        )
        require(
            len(set(self.nce_layers)) == len(self.nce_layers), "model.nce_layers", self.nce_layers, "distinct indices"
        )
        require(self.nce_patches >= 1, "model.nce_patches", self.nce_patches, "an integer >= 1")
        require(self.nce_mlp_channels >= 1, "model.nce_mlp_channels", self.nce_mlp_channels, "an integer >= 1")
        fast = self.family == "fastcut"
        if self.nce_identity is None:
            self.nce_identity = not fast
        if self.flip_equivariance is None:
            self.flip_equivariance = fast

    def channels(self, domain: str) -> int:
        """The image channels of domain "x" or "y" (3 where neither the config nor the data set them)."""
        value = self.x_channels if domain == "x" else self.y_channels
        return 3 if value is None else value

    @property
    def in_channels(self) -> int:
        """G's input channels (X's alone unless the full Config set input_nc from data.extra)."""
        return self.channels("x") if self.input_nc is None else self.input_nc

    def generator_channels(self, source: str, target: str) -> tuple[int, int]:
        """(input, output) channels of the generator from domain `source` to `target`: the source's image channels
        plus the extra channels of data.extra, and the target's."""
        return self.channels(source) + self.in_channels - self.channels("x"), self.channels(target)

    def min_image_multiple(self) -> int:
        """The spatial size of images must be a multiple of this for the chosen generator."""
        return GENERATOR_FACTS[self.generator].multiple(self)


@dataclass(kw_only=True)
class LossConfig:
    """The adversarial objective and the weights of the cycle, identity, NCE and feature losses."""

    gan_mode: Literal["lsgan", "vanilla", "hinge", "wgangp"] = "lsgan"
    """Adversarial objective: least squares (the paper and the article), BCE-with-logits, hinge, or wgangp (WGAN:
    critic scores, with a gradient penalty on random interpolates of real and fake images, weight lambda_gp)."""
    lambda_gp: float = 10.0
    """gan_mode=wgangp: weight of the gradient penalty (||grad D(interpolate)||_2 - 1)^2 of each discriminator,
    relative to its critic loss mean D(fake) - mean D(real) (Gulrajani et al.'s 10); the whole discriminator loss
    is halved, as every discriminator loss here is."""
    lambda_adv: float = 1.0
    """Weight of each generator's adversarial term."""
    lambda_cycle: float = 10.0
    """lambda in Eq. 3 of the paper; weight of ||F(G(x)) - x||_1 and ||G(F(y)) - y||_1."""
    lambda_identity: float = 0.5
    """Identity loss ||G(y) - y||_1 + ||F(x) - x||_1 at weight lambda_identity * lambda_cycle (the paper's 0.5)."""
    lambda_preserve: float = 0.0
    """The article's input-preservation term ||G(x) - x||_1 + ||F(y) - y||_1 (the article uses 0.5); 0 disables."""
    lambda_feature: float = 0.0
    """Feature-level cycle loss ||H(F(G(x))) - H(x)||_1 + ||H(G(F(y))) - H(y)||_1; needs discriminator=hnet."""
    lambda_nce: float | None = None
    """CUT/FastCUT: weight of the PatchNCE loss (null: 1 for cut, 10 for fastcut). The cycle, identity, preserve
    and feature weights above are CycleGAN's and unused by them."""
    nce_temperature: float = 0.07
    """CUT/FastCUT: temperature tau of the PatchNCE softmax."""

    def __post_init__(self) -> None:
        require(self.lambda_gp >= 0, "loss.lambda_gp", self.lambda_gp, "a number >= 0")
        require(self.nce_temperature > 0, "loss.nce_temperature", self.nce_temperature, "a number > 0")
        if self.lambda_nce is not None:
            require(self.lambda_nce >= 0, "loss.lambda_nce", self.lambda_nce, "a number >= 0 or null")
        for name in ("lambda_adv", "lambda_cycle", "lambda_identity", "lambda_preserve", "lambda_feature"):
            value = getattr(self, name)
            require(value >= 0, f"loss.{name}", value, "a number >= 0")
