"""The whole run configuration (`Config`): one field per section and the checks that span sections."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field

from trainer.config.checks import ConfigError, refuse_unused
from trainer.config.generators import GENERATOR_FACTS, generators_where
from trainer.config.model import CONTRASTIVE_FAMILIES, LossConfig, ModelConfig
from trainer.config.sections import (
    EXTRA_CHANNELS,
    CheckpointConfig,
    DataConfig,
    DistributedConfig,
    EMAConfig,
    EvalConfig,
    LoggingConfig,
    OptimizerConfig,
    ProfileConfig,
    ScheduleConfig,
    TrainConfig,
)


@dataclass(kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        input_nc = self.model.channels("x") + EXTRA_CHANNELS[self.data.extra]
        if self.model.input_nc not in (None, input_nc):
            raise ConfigError(
                f"model.input_nc={self.model.input_nc} contradicts model.x_channels={self.model.channels('x')} and "
                f"data.extra={self.data.extra} ({input_nc} channels); leave model.input_nc unset"
            )
        self.model.input_nc = input_nc
        self._resolve_family()
        if self.model.channels("x") != self.model.channels("y"):
            self._channels_differ()
        if self.loss.lambda_feature > 0 and self.model.discriminator != "hnet":
            raise ConfigError(
                f"loss.lambda_feature={self.loss.lambda_feature} needs model.discriminator=hnet "
                f"(got {self.model.discriminator}); set lambda_feature to 0 or use the hnet discriminator"
            )
        if self.train.fuse_generator_passes and self.model.norm_g == "batch":
            raise ConfigError(
                "train.fuse_generator_passes=true needs model.norm_g=instance or none: batch norm would compute its "
                "statistics over both domains at once; set it to false for model.norm_g=batch"
            )
        if self.train.activation_checkpointing and not GENERATOR_FACTS[self.model.generator].checkpointable:
            raise ConfigError(
                f"train.activation_checkpointing=true is not available for model.generator={self.model.generator}; "
                f"expected one of {', '.join(generators_where(lambda facts: facts.checkpointable))}"
            )
        if self.loss.gan_mode == "wgangp":
            self._check_penalty()
        if self.train.hang_timeout_s >= self.distributed.timeout_s:
            raise ConfigError(
                f"train.hang_timeout_s={self.train.hang_timeout_s:g} must be below distributed.timeout_s="
                f"{self.distributed.timeout_s}: a hung peer would fail the collective before the watchdog reports "
                "it; lower it, or set it to 0 to turn the watchdog off"
            )
        multiple = self.model.min_image_multiple()
        if self.data.crop_size % multiple:
            raise ConfigError(
                f"data.crop_size={self.data.crop_size} must be a multiple of {multiple} for "
                f"model.generator={self.model.generator}"
            )

    def _resolve_family(self) -> None:
        """The family's defaults (pool, lambda_nce) and the settings CUT/FastCUT cannot use."""
        contrastive = self.model.family in CONTRASTIVE_FAMILIES
        if self.train.pool_size is None:
            self.train.pool_size = 0 if contrastive else 50
        if not contrastive:
            refuse_unused(self.loss, "loss.", ("lambda_nce", "nce_temperature"), self.model.family)
            return
        if self.loss.lambda_nce is None:
            self.loss.lambda_nce = 10.0 if self.model.family == "fastcut" else 1.0
        for key in ("lambda_preserve", "lambda_feature"):
            if getattr(self.loss, key) > 0:
                raise ConfigError(
                    f"loss.{key}={getattr(self.loss, key)} is a CycleGAN term; model.family={self.model.family} has "
                    "no second generator: set it to 0"
                )
        if self.eval.select == "cycle":
            raise ConfigError(
                f"eval.select=cycle needs reconstructions; model.family={self.model.family} has none: use psnr or fid"
            )

    def _channels_differ(self) -> None:
        """X and Y of different channel counts: no identity terms (G(y) would feed Y's channels to G); refuse the
        terms that compare an image with its translation and the discriminator trunk that both domains share."""
        self.loss.lambda_identity = 0.0
        if self.model.family in CONTRASTIVE_FAMILIES:
            self.model.nce_identity = False
        counts = f"X has {self.model.channels('x')} channels and Y {self.model.channels('y')}"
        if self.loss.lambda_preserve > 0:
            raise ConfigError(f"loss.lambda_preserve={self.loss.lambda_preserve} compares G(x) with x, but {counts}")
        if self.model.discriminator == "hnet":
            raise ConfigError(f"model.discriminator=hnet shares one trunk between D_X and D_Y, but {counts}")

    def _check_penalty(self) -> None:
        """loss.gan_mode=wgangp differentiates the discriminators twice: refuse what cannot."""
        if self.train.compile:
            raise ConfigError(
                "loss.gan_mode=wgangp with train.compile=true: torch.compile cannot differentiate twice (the "
                "gradient penalty); set train.compile=false or use another gan_mode"
            )
        if self.model.norm_d == "batch":
            raise ConfigError(
                "loss.gan_mode=wgangp with model.norm_d=batch: batch norm mixes the interpolates of a batch, so the "
                "penalty is not per image; use model.norm_d=instance or none"
            )
        if self.train.precision == "fp16":
            raise ConfigError(
                "loss.gan_mode=wgangp with train.precision=fp16: the penalty's input gradient is not loss-scaled and "
                "underflows in fp16; use bf16 or fp32"
            )


def section_summaries() -> dict[str, str]:
    """Each config section's name and the first line of its documentation, in order."""
    hints = typing.get_type_hints(Config)
    return {f.name: inspect.getdoc(hints[f.name]).splitlines()[0] for f in dataclasses.fields(Config)}
