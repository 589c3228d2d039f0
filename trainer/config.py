"""Typed run configuration: dataclasses, YAML loading, dotted command-line overrides, validation.

Later sources win: dataclass defaults, then the YAML file, then `key.path=value` overrides. Every user mistake
(unknown key, wrong type, impossible value) raises `ConfigError` with one line naming the key, the value and what is
allowed. This module knows nothing about torch.distributed or accelerate.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from shards.bounded_read import MAX_DEPTH, BoundedReadError, check_depth, read_limited
from shards.decode import DEFAULT_MAX_PIXELS

GeneratorName = Literal[
    "resnet_9blocks", "resnet_6blocks", "resnet", "unet_article", "unet_128", "unet_256", "encoder_decoder", "densenet"
]
DiscriminatorName = Literal["patchgan", "pixel", "hnet"]
NormName = Literal["batch", "instance", "none"]
FamilyName = Literal["cyclegan", "cut", "fastcut"]
CONTRASTIVE_FAMILIES = ("cut", "fastcut")
"""Families trained with PatchNCE (trainer/cut.py): one generator X -> Y and one discriminator."""
NCE_GENERATORS = ("resnet_9blocks", "resnet_6blocks", "resnet")
"""Generators whose encoder layers PatchNCE reads (a flat stack of layers, like the paper's)."""
NCE_MODEL_FIELDS = ("nce_layers", "nce_patches", "nce_mlp_channels", "nce_identity", "flip_equivariance")
"""The model fields only CUT/FastCUT use."""
TRAINING_MODEL_FIELDS = ("nce_patches", "nce_identity", "flip_equivariance")
"""Model fields that change how the units train, not their weights: a resumed run may change them."""
RESNET_STEM_LAYERS = 10
"""Layers of the ResNet generator before its first residual block (stem conv and two downsamplings)."""
CHECKPOINTED_GENERATORS = ("resnet_9blocks", "resnet_6blocks", "resnet", "unet_article", "unet_128", "unet_256")
"""Generators whose blocks train.activation_checkpointing can recompute."""


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names the key and what is allowed."""


@dataclass(kw_only=True)
class ModelConfig:
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
    input_nc: int | None = None
    """Generator input channels: 3 plus the channels of data.extra (set from it when null)."""
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
        _require(self.ngf >= 1, "model.ngf", self.ngf, "an integer >= 1")
        _require(self.ndf >= 1, "model.ndf", self.ndf, "an integer >= 1")
        _require(self.n_layers_d >= 1, "model.n_layers_d", self.n_layers_d, "an integer >= 1")
        fixed = {"resnet_6blocks": 6, "resnet_9blocks": 9}.get(self.generator)
        if fixed is not None and self.n_blocks not in (None, fixed):
            raise ConfigError(
                f"model.n_blocks={self.n_blocks} contradicts model.generator={self.generator}; "
                "use model.generator=resnet to choose the block count"
            )
        if self.n_blocks is None:
            self.n_blocks = fixed or {"densenet": 3}.get(self.generator, 9)
        _require(self.n_blocks >= 1, "model.n_blocks", self.n_blocks, "an integer >= 1")
        _require(1 <= self.n_skip <= 6, "model.n_skip", self.n_skip, "an integer in [1, 6]")
        _require(self.init_gain > 0, "model.init_gain", self.init_gain, "a number > 0")
        max_trunk = self.n_layers_d + 1
        _require(
            1 <= self.hnet_trunk_layers <= max_trunk,
            "model.hnet_trunk_layers",
            self.hnet_trunk_layers,
            f"an integer in [1, {max_trunk}] (n_layers_d + 1)",
        )
        if self.family in CONTRASTIVE_FAMILIES:
            self._resolve_nce()
        else:
            _refuse_unused(self, "model.", NCE_MODEL_FIELDS, self.family)

    def _resolve_nce(self) -> None:
        """Check the CUT/FastCUT fields and fill in the family's defaults."""
        if self.generator not in NCE_GENERATORS:
            raise ConfigError(
                f"model.family={self.family} needs a ResNet generator ({', '.join(NCE_GENERATORS)}), got "
                f"model.generator={self.generator}: PatchNCE reads the features of its encoder layers"
            )
        if self.discriminator == "hnet":
            raise ConfigError(
                f"model.family={self.family} trains one discriminator; model.discriminator=hnet is CycleGAN's pair "
                "with a shared trunk: use patchgan or pixel"
            )
        depth = RESNET_STEM_LAYERS + self.n_blocks
        if self.nce_layers is None:
            self.nce_layers = [layer for layer in (0, 4, 7, 10, 14) if layer < depth]
        _require(
            bool(self.nce_layers) and all(0 <= layer < depth for layer in self.nce_layers),
            "model.nce_layers",
            self.nce_layers,
            f"a non-empty list of layer indices in [0, {depth - 1}] for this generator",
        )
        _require(
            len(set(self.nce_layers)) == len(self.nce_layers), "model.nce_layers", self.nce_layers, "distinct indices"
        )
        _require(self.nce_patches >= 1, "model.nce_patches", self.nce_patches, "an integer >= 1")
        _require(self.nce_mlp_channels >= 1, "model.nce_mlp_channels", self.nce_mlp_channels, "an integer >= 1")
        fast = self.family == "fastcut"
        if self.nce_identity is None:
            self.nce_identity = not fast
        if self.flip_equivariance is None:
            self.flip_equivariance = fast

    @property
    def in_channels(self) -> int:
        """Generator input channels (RGB alone unless the full Config set input_nc from data.extra)."""
        return 3 if self.input_nc is None else self.input_nc

    def min_image_multiple(self) -> int:
        """The spatial size of images must be a multiple of this for the chosen generator."""
        return {"unet_128": 2**7, "unet_256": 2**8, "unet_article": 2**self.n_skip, "encoder_decoder": 16}.get(
            self.generator, 4
        )


@dataclass(kw_only=True)
class LossConfig:
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
        _require(self.lambda_gp >= 0, "loss.lambda_gp", self.lambda_gp, "a number >= 0")
        _require(self.nce_temperature > 0, "loss.nce_temperature", self.nce_temperature, "a number > 0")
        if self.lambda_nce is not None:
            _require(self.lambda_nce >= 0, "loss.lambda_nce", self.lambda_nce, "a number >= 0 or null")
        for name in ("lambda_adv", "lambda_cycle", "lambda_identity", "lambda_preserve", "lambda_feature"):
            value = getattr(self, name)
            _require(value >= 0, f"loss.{name}", value, "a number >= 0")


@dataclass(kw_only=True)
class OptimizerConfig:
    lr: float = 2e-4
    """Adam learning rate of the generator pair (and of the discriminator pair unless lr_d is set)."""
    lr_d: float | None = None
    """Adam learning rate of the discriminator pair; null means lr."""
    beta1: float = 0.5
    """Adam beta1 (the paper uses 0.5)."""
    beta2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) for both units."""
    lr_scaling: Literal["auto", "none", "linear", "sqrt"] = "auto"
    """Scale lr and lr_d by r = global batch / base_batch (linear), by sqrt(r), or not; auto: by min(r, 8), with a
    linear warm-up over the first 512 images when r > 1 and schedule.warmup_steps is 0 (what
    benchmarks/time_to_quality.py found best; README, Performance). The global batch is train.batch_size x world
    size x train.grad_accum_steps."""
    base_batch: int = 1
    """The global batch the learning rates are given for (the paper trains at batch 1)."""
    clip_grad_norm_g: float = 0.0
    """Clip the generator pair's gradient norm to this value; 0 disables clipping."""
    clip_grad_norm_d: float = 0.0
    """Clip the discriminator pair's gradient norm to this value; 0 disables clipping."""
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """AdamW kernel: fused (one kernel per step, CUDA), foreach (batched over tensors), for_loop (one tensor at a
    time, the reference's default); auto picks fused on CUDA and foreach elsewhere."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", self.lr, "a number > 0")
        if self.lr_d is not None:
            _require(self.lr_d > 0, "optimizer.lr_d", self.lr_d, "a number > 0 or null")
        _require(0 <= self.beta1 < 1, "optimizer.beta1", self.beta1, "a number in [0, 1)")
        _require(0 <= self.beta2 < 1, "optimizer.beta2", self.beta2, "a number in [0, 1)")
        _require(self.eps > 0, "optimizer.eps", self.eps, "a number > 0")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "a number >= 0")
        _require(self.base_batch >= 1, "optimizer.base_batch", self.base_batch, "an integer >= 1")
        _require(self.clip_grad_norm_g >= 0, "optimizer.clip_grad_norm_g", self.clip_grad_norm_g, "a number >= 0")
        _require(self.clip_grad_norm_d >= 0, "optimizer.clip_grad_norm_d", self.clip_grad_norm_d, "a number >= 0")


@dataclass(kw_only=True)
class ScheduleConfig:
    kind: Literal["linear", "cosine", "constant"] = "linear"
    """linear: constant, then linear decay to zero at train.steps (the paper); cosine: cosine decay to zero."""
    warmup_steps: int = 0
    """Linear warmup from 0 to the full learning rate over this many steps."""
    decay_start: float = 0.5
    """For kind=linear: fraction of train.steps after which the linear decay starts (the paper: 100 of 200 epochs)."""

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(0 <= self.decay_start <= 1, "schedule.decay_start", self.decay_start, "a number in [0, 1]")


EXTRA_CHANNELS = {"none": 0, "hist": 24, "label": 1}
"""Generator input channels added by each per-sample extra (hist: 8 bins x RGB; label: one map)."""


@dataclass(kw_only=True)
class DataConfig:
    root: str = ""
    """Tar shards with a manifest.json (written by `python -m shards.write` or `shards.synthetic`): a directory or
    the URL of one on a store, `s3://bucket/prefix`, `gs://bucket/prefix` or `http(s)://host/path`."""
    x_train: str = ""
    """Shard URLs of the X training set instead of root's manifest: a path or URL, a brace pattern
    (`data/x-train-{000000..000009}.tar`), several separated by spaces, or one `pipe:` command; counted by a
    scan at start."""
    y_train: str = ""
    """Shard URLs of the Y training set (see x_train)."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs (they run a shell command)."""
    load_size: int = 286
    """Images are resized to load_size x load_size, then randomly cropped to crop_size (the paper: 286 -> 256)."""
    crop_size: int = 256
    """Training resolution."""
    flip: bool = True
    """Random horizontal flip."""
    rotation_deg: float = 0.0
    """Random rotation in [-rotation_deg, rotation_deg]; 0 disables it."""
    scale_min: float = 1.0
    """Random zoom: resize to load_size x s, s uniform in [scale_min, 1], before the crop; 1 disables it."""
    extra: Literal["none", "hist", "label"] = "none"
    """Per-sample extra fed to the generators as extra input channels: a colour histogram (hist.npy) or a label
    map (label.png) stored in the shards."""
    shuffle_buffer: int = 256
    """Samples held in each (rank, worker, domain) shuffle buffer."""
    num_workers: int = 2
    """Loader worker processes per rank; each reads its own part of the shards."""
    resampled: bool = False
    """Draw each epoch's shard list with replacement instead of a permutation."""
    max_bad_fraction: float = 0.01
    """Training stops with an error when more than this fraction of the samples read so far were bad (checked
    once at least 100 samples were read)."""
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    """Images (and label maps) larger than this many pixels, judged from their header before decoding, are bad
    samples (decompression bombs); PIL refuses more than 179 megapixels regardless."""
    retries: int = 5
    """Transient failures in a row (connection refused or reset, timeout, HTTP 5xx) retried per remote shard read,
    with exponential backoff, before the shard is skipped as unavailable (its samples count as bad)."""
    retry_backoff_s: float = 0.5
    """The first retry's wait; each further one in a row waits twice as long."""
    io_timeout_s: float = 60.0
    """A remote read that waits this long for data fails (and is retried)."""
    io_min_rate_kib_s: float = 16.0
    """Each io_timeout_s of time spent reading one connection to a remote object must bring at least this many
    KiB/s: a store that trickles is dropped like a timeout and retried (0: no such check)."""
    s3_endpoint_url: str = ""
    """An S3-compatible store's endpoint (MinIO, Ceph, ...); empty: AWS_ENDPOINT_URL or AWS itself. Credentials
    come from the standard AWS variables and files, never from this config."""
    cache_dir: str = ""
    """A node-local directory caching remote shards (verified against the manifest's sha256), so that later
    epochs read local disk; shared safely by all ranks and workers of a node. Empty: no cache."""
    cache_max_gb: float = 100.0
    """The cache's size bound; the least recently used shards are deleted beyond it."""

    def __post_init__(self) -> None:
        _require(self.crop_size >= 1, "data.crop_size", self.crop_size, "an integer >= 1")
        if self.crop_size > self.load_size:
            raise ConfigError(
                f"data.crop_size={self.crop_size} exceeds data.load_size={self.load_size}; "
                "lower crop_size or raise load_size"
            )
        _require(0 <= self.rotation_deg <= 180, "data.rotation_deg", self.rotation_deg, "a number in [0, 180]")
        _require(0 < self.scale_min <= 1, "data.scale_min", self.scale_min, "a number in (0, 1]")
        if self.load_size * self.scale_min < self.crop_size:
            raise ConfigError(
                f"data.scale_min={self.scale_min} shrinks data.load_size={self.load_size} below "
                f"data.crop_size={self.crop_size}; raise scale_min"
            )
        _require(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "an integer >= 1")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "an integer >= 0")
        _require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", self.max_bad_fraction, "a number in [0, 1]")
        _require(self.max_image_pixels >= 1, "data.max_image_pixels", self.max_image_pixels, "an integer >= 1")
        _require(self.retries >= 0, "data.retries", self.retries, "an integer >= 0")
        _require(self.retry_backoff_s >= 0, "data.retry_backoff_s", self.retry_backoff_s, "a number >= 0")
        _require(self.io_timeout_s > 0, "data.io_timeout_s", self.io_timeout_s, "a number > 0")
        _require(self.io_min_rate_kib_s >= 0, "data.io_min_rate_kib_s", self.io_min_rate_kib_s, "a number >= 0")
        _require(self.cache_max_gb > 0, "data.cache_max_gb", self.cache_max_gb, "a number > 0")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer updates of each unit."""
    batch_size: int = 1
    """Images of each domain per rank per step (the global batch is batch_size x world size)."""
    run_dir: str = "runs/default"
    """Where the resolved config, metrics.jsonl, image grids, checkpoints and exported weights go."""
    seed: int = 0
    """Seeds weights, data order, augmentation and the image pools."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """bf16/fp16 autocast the networks' forward passes (losses stay fp32); fp16 adds a loss scaler per unit; auto
    is bf16 where the GPU or CPU computes it natively, else fp32 (trainer.precision)."""
    grad_accum_steps: int = 1
    """Micro-batches of batch_size accumulated into one optimizer update of each unit."""
    compile: bool = False
    """torch.compile the generators and discriminators (in place; weights keep their names)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode with compile=true: reduce-overhead and max-autotune replay CUDA graphs on GPUs (fewer
    kernel launches: pays at small batches); max-autotune also searches for faster kernels (longer compile)."""
    fuse_generator_passes: bool = False
    """Run each generator's translation and identity passes (G(x) and G(y)) as one call on the concatenated
    batch: 4 generator calls per step instead of 6, larger kernels. Exactly the same math with instance norm;
    refused with batch norm, whose statistics would then mix the two domains."""
    activation_checkpointing: bool = False
    """Recompute the generators' residual / U-Net blocks in the backward pass instead of keeping their
    activations: much less memory for large crops (512 px and up) for about one more forward of those blocks."""
    pool_size: int | None = None
    """Image history pool of generated images shown to the discriminators; 0 disables it. Null: 50 for CycleGAN
    (the paper), 0 for CUT/FastCUT (theirs has none)."""
    channels_last: bool = False
    """Keep the networks' weights (and so their activations) in channels-last memory format (NHWC), which
    convolution kernels of GPUs' tensor cores and of oneDNN on CPUs prefer."""
    resume: str = "auto"
    """auto: continue from the newest intact checkpoint of run_dir if there is one; none: start fresh; or the
    path of a checkpoint directory to continue from."""
    overwrite: bool = False
    """With resume=none, allow starting over in a run_dir that has checkpoints (they are deleted)."""
    max_nonfinite_steps: int = 20
    """A unit whose loss or gradient norm is NaN or infinite skips that update (counted as loss/nonfinite_g or
    loss/nonfinite_d); after this many consecutive skipped updates of a unit the run stops with an error."""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "train.steps", self.steps, "an integer >= 1")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        _require(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, "an integer >= 1")
        _require(bool(self.run_dir), "train.run_dir", self.run_dir, "a non-empty path")
        _require(self.seed >= 0, "train.seed", self.seed, "an integer >= 0")
        if self.pool_size is not None:
            _require(self.pool_size >= 0, "train.pool_size", self.pool_size, "an integer >= 0 or null")
        _require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", self.max_nonfinite_steps, "an integer > 0")


@dataclass(kw_only=True)
class DistributedConfig:
    backend: Literal["auto", "ddp", "fsdp2", "deepspeed"] = "auto"
    """auto follows the launcher: DeepSpeed (stage and offload from the accelerate config) when launched with a
    DeepSpeed accelerate config (launch/zero*.yaml), FSDP2 with an FSDP one (launch/fsdp2*.yaml), else DDP.
    ddp, fsdp2 and deepspeed force a backend."""
    zero_stage: Literal[1, 2, 3] = 2
    """ZeRO stage for backend=deepspeed: 1 shards optimizer states, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer states in CPU memory."""
    offload_params: bool = False
    """DeepSpeed ZeRO-3: keep parameters in CPU memory."""
    reshard_after_forward: bool = True
    """FSDP2: free each block's gathered weights after its forward and gather them again for backward (less memory,
    one more all-gather per block); false keeps them until the backward is done."""
    fsdp_min_block_params: int = 2**20
    """FSDP2: a submodule holding at least this many parameters outside smaller groups is sharded and gathered as
    its own group (a block); each network and each unit gathers the rest."""
    sync_batchnorm: bool = True
    """DDP on CUDA: convert BatchNorm layers to SyncBatchNorm so statistics cover the global batch."""
    cpu: bool = False
    """Train on CPU even when CUDA is available."""
    bucket_cap_mb: int = 25
    """DDP: gradients are all-reduced in buckets of this many MiB, overlapping communication with backward."""
    static_graph: bool = False
    """DDP: promise the same graph every step, letting DDP skip per-step unused-parameter bookkeeping."""
    timeout_s: int = 600
    """Process-group timeout: a hung collective fails after this many seconds instead of blocking forever."""
    debug_skip_grad_sync: bool = False
    """Test-only: DDP never all-reduces gradients, so ranks drift apart (proves the synchronization tests can fail)."""

    def __post_init__(self) -> None:
        _require(self.timeout_s >= 1, "distributed.timeout_s", self.timeout_s, "an integer >= 1")
        _require(self.bucket_cap_mb >= 1, "distributed.bucket_cap_mb", self.bucket_cap_mb, "an integer >= 1")
        _require(
            self.fsdp_min_block_params >= 1, "distributed.fsdp_min_block_params", self.fsdp_min_block_params, ">= 1"
        )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"distributed.offload_params=true needs distributed.zero_stage=3 (got {self.zero_stage})")
        if self.backend in ("ddp", "fsdp2") and (self.offload_optimizer or self.offload_params):
            raise ConfigError("distributed.offload_optimizer/offload_params need distributed.backend=deepspeed or auto")


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: Literal["online", "offline", "disabled"] = "disabled"
    """Weights & Biases mode; offline writes the run under run_dir/wandb for a later `wandb sync`."""
    wandb_fallback: Literal["offline", "stop"] = "offline"
    """When W&B cannot start online (no API key, an unreachable or silent server) or fails during the run: offline
    goes on, saying so in one line (logging to W&B offline, or after a failure during the run only to metrics.jsonl);
    stop ends the run with a one-line error (exit code 2)."""
    wandb_init_timeout_s: float = 60.0
    """Seconds W&B may take to start a run (its init_timeout) before wandb_fallback applies."""
    project: str = ""
    """W&B project; empty: $WANDB_PROJECT, else cyclegan-dist."""
    entity: str = ""
    """W&B entity (team or user); empty: $WANDB_ENTITY or your default."""
    run_name: str = ""
    """W&B run name; empty: $WANDB_NAME or a generated one."""
    group: str = ""
    """W&B run group; empty: $WANDB_RUN_GROUP or none."""
    tags: str = ""
    """W&B tags, comma-separated; empty: $WANDB_TAGS or none."""
    every_steps: int = 10
    """Scalars are reduced across ranks and written every N steps."""
    image_every_steps: int = 100
    """Sample grids (x | G(x) | F(G(x)) and y | F(y) | G(F(y))) every N steps and at the end; 0: only at the end."""
    sample_images: int = 4
    """Fixed test images per domain shown in the sample grids."""
    spike_factor: float = 5.0
    """Save a step's inputs, outputs and losses to run_dir/spikes/ when a loss term exceeds this multiple of its
    running median; 0 disables the capture."""
    spike_check_steps: int = 8
    """The capture keeps the last N steps on the device and checks them together (one host sync per N steps)."""

    def __post_init__(self) -> None:
        _require(
            self.wandb_init_timeout_s > 0, "logging.wandb_init_timeout_s", self.wandb_init_timeout_s, "a number > 0"
        )
        _require(self.every_steps >= 1, "logging.every_steps", self.every_steps, "an integer >= 1")
        _require(self.image_every_steps >= 0, "logging.image_every_steps", self.image_every_steps, "an integer >= 0")
        _require(self.sample_images >= 1, "logging.sample_images", self.sample_images, "an integer >= 1")
        _require(
            self.spike_factor == 0 or self.spike_factor > 1,
            "logging.spike_factor",
            self.spike_factor,
            "0 (off) or a number > 1",
        )
        _require(self.spike_check_steps >= 1, "logging.spike_check_steps", self.spike_check_steps, "an integer >= 1")


@dataclass(kw_only=True)
class EvalConfig:
    every_steps: int = 0
    """Evaluate on the test split every N steps (and at the end); 0 means only at the end."""
    images: int = 64
    """Test images per domain, split over the ranks; 0 disables evaluation."""
    batch_size: int = 16
    """Images per generator forward during evaluation, per rank."""
    inception_weights: str = ""
    """Local TorchScript Inception-v3 feature network for FID and KID (the inception-2015-12-05.pt used by
    StyleGAN2-ADA and clean-fid); empty: no FID/KID. Nothing is ever downloaded."""
    kid_subset_size: int = 1000
    """Samples per KID subset (at most the number of test images)."""
    select: Literal["none", "psnr", "fid", "cycle"] = "none"
    """Keep the best checkpoint by this metric (RUN/checkpoints/best.json), never deleted by rotation: psnr (mean
    of both directions, needs a test split with a known answer), fid (mean of both directions), cycle (mean L1)."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "eval.every_steps", self.every_steps, "an integer >= 0")
        _require(self.images >= 0, "eval.images", self.images, "an integer >= 0")
        _require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an integer >= 1")
        _require(self.kid_subset_size >= 2, "eval.kid_subset_size", self.kid_subset_size, "an integer >= 2")
        if self.select == "fid" and not self.inception_weights:
            raise ConfigError("eval.select=fid needs eval.inception_weights (a local TorchScript Inception file)")
        if self.select != "none" and self.images == 0:
            raise ConfigError(f"eval.select={self.select} needs eval.images > 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a checkpoint every N steps (and always at the end); 0 saves only at the end."""
    keep: int = 3
    """Newest checkpoints kept; older ones are deleted after a new one is complete."""
    keep_every_steps: int = 0
    """Also keep every checkpoint whose step is a multiple of this forever; 0 disables it."""
    preempt_check_steps: int = 5
    """Ranks agree on a received SIGUSR1/SIGTERM every N steps (one tiny all-reduce), then save and exit."""
    async_save: bool = False
    """Training stops only to copy the state into host memory; a background thread writes the files and publishes
    the checkpoint (one save in flight; the next save, a preemption and the end of training wait for it)."""

    def __post_init__(self) -> None:
        _require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "an integer >= 0")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")
        _require(self.keep_every_steps >= 0, "checkpoint.keep_every_steps", self.keep_every_steps, "an integer >= 0")
        _require(
            self.preempt_check_steps >= 1, "checkpoint.preempt_check_steps", self.preempt_check_steps, "an integer >= 1"
        )


@dataclass(kw_only=True)
class EMAConfig:
    enabled: bool = False
    """Keep an exponential moving average of the generators' weights (StyleGAN2-ADA's rule) and use it for
    evaluation, sample grids and the export (the raw generators are exported too, under export/raw)."""
    half_life_images: int = 10000
    """Images (per domain, over all ranks) after which a weight's contribution to the average has halved."""
    rampup: float = 0.05
    """Early in training the half-life is at most this fraction of the images seen so far (0: no ramp-up)."""
    eval_raw: bool = False
    """Also evaluate the raw generators at each evaluation, logged as eval_raw/* (one more pass over the test set)."""

    def __post_init__(self) -> None:
        _require(self.half_life_images >= 1, "ema.half_life_images", self.half_life_images, "an integer >= 1")
        _require(self.rampup >= 0, "ema.rampup", self.rampup, "a number >= 0")
        if self.eval_raw and not self.enabled:
            raise ConfigError("ema.eval_raw=true needs ema.enabled=true: without an average, eval/ is of the raw ones")


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

    def __post_init__(self) -> None:
        input_nc = 3 + EXTRA_CHANNELS[self.data.extra]
        if self.model.input_nc not in (None, input_nc):
            raise ConfigError(
                f"model.input_nc={self.model.input_nc} contradicts data.extra={self.data.extra} ({input_nc} channels); "
                "leave model.input_nc unset"
            )
        self.model.input_nc = input_nc
        self._resolve_family()
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
        if self.distributed.backend == "fsdp2" and "batch" in (self.model.norm_g, self.model.norm_d):
            raise ConfigError(
                "distributed.backend=fsdp2 with model.norm_g/norm_d=batch: FSDP2 keeps each rank's batch-norm "
                "statistics apart (no SyncBatchNorm); use instance norm or DDP"
            )
        if self.train.activation_checkpointing and self.model.generator not in CHECKPOINTED_GENERATORS:
            raise ConfigError(
                f"train.activation_checkpointing=true is not available for model.generator={self.model.generator}; "
                f"expected one of {', '.join(CHECKPOINTED_GENERATORS)}"
            )
        if self.loss.gan_mode == "wgangp":
            self._check_penalty()
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
            _refuse_unused(self.loss, "loss.", ("lambda_nce", "nce_temperature"), self.model.family)
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


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 80, 80
MAX_YAML_VALUES = 100_000
"""A config's values counted with YAML aliases expanded: more is refused (an alias bomb under a known key)."""
MAX_CONFIG_BYTES = 1 << 20
"""Bytes of a config file read at most (ours are a few KiB): a larger file is refused before it is parsed."""


def _show(value: Any) -> str:
    """repr of a value for an error message, bounded in size whatever the value (aliases share structure)."""
    return _SHORT.repr(value)


def field_defaults(cls: type) -> dict[str, Any]:
    """The default of each field of dataclass `cls` that has a plain one, by name."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def _refuse_unused(section: Any, prefix: str, names: tuple[str, ...], family: str) -> None:
    """Refuse a CUT/FastCUT field among `names` of `section` set away from its default under `family`."""
    defaults = field_defaults(type(section))
    for name in names:
        if getattr(section, name) != defaults[name]:
            raise ConfigError(
                f"{prefix}{name}={_show(getattr(section, name))} is a CUT/FastCUT setting; model.family={family} "
                "does not use it"
            )


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={_show(value)} is not allowed; expected {allowed}")


def _expanded_size(value: Any, memo: dict[int, int]) -> int:
    """Values in `value` with every shared (aliased) part counted each time it appears; linear in the YAML."""
    if not isinstance(value, (dict, list)):
        return 1
    if id(value) not in memo:
        memo[id(value)] = 0  # a recursive alias counts as nothing more
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        memo[id(value)] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[id(value)]


def _safe_yaml(text: str, source: str) -> Any:
    """yaml.safe_load with one-line errors (line and column) and bounds on alias expansion and nesting."""
    try:
        value = yaml.safe_load(text)
        size = _expanded_size(value, {})
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}") from None
    except RecursionError:  # the parser and _expanded_size recurse once per level
        raise ConfigError(f"{source} nests deeper than {MAX_DEPTH} levels") from None
    if size > MAX_YAML_VALUES:
        raise ConfigError(f"{source} expands to more than {MAX_YAML_VALUES} values through YAML aliases")
    try:
        return check_depth(value, source)  # after the size bound: it walks every aliased path
    except BoundedReadError as err:
        raise ConfigError(str(err)) from None


def _read_config(path: Path) -> str:
    """The text of config file `path` (a symlink is followed: the user named it), at most MAX_CONFIG_BYTES."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file such as configs/demo-cpu.yaml")
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = read_limited(path.resolve() if path.is_symlink() else path, MAX_CONFIG_BYTES, "config file")
        return data.decode()
    except BoundedReadError as err:
        raise ConfigError(str(err)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a Config from an optional YAML file and `section.key=value` overrides.

    Raises:
        ConfigError: for a missing or malformed file, an unknown key, a wrong type or an impossible value.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = _safe_yaml(_read_config(path), f"config file {path}")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded or {}
    for item in overrides:
        _apply_override(data, item)
    return from_dict(Config, data, "")


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.batch_size=8")
    *parents, leaf = key.split(".")
    node = data
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[: depth + 1])} is a value, not a section")
        node = child
    node[leaf] = _safe_yaml(raw, f"override {key}") if raw else ""


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from nested dicts, checking keys and types; `prefix` names the section in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown key {path}; valid keys here: {', '.join(fields)}{hint}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = from_dict(kind, value, f"{path}.")
        else:
            kwargs[key] = _coerce(value, kind, path)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, path: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise ConfigError(f"{path}={_show(value)} is not allowed; expected one of: {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _coerce(value, inner, path)
    if origin is list:
        (inner,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise ConfigError(f"{path}={_show(value)} has the wrong type; expected a list, e.g. [0, 4]")
        return [_coerce(item, inner, f"{path}[{i}]") for i, item in enumerate(value)]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            # YAML 1.1 reads "2e-4" (no dot) as a string; accept it for float fields.
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path}={_show(value)} is not allowed; expected a finite number")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {kind} at {path}")
    raise ConfigError(f"{path}={_show(value)} has the wrong type; expected {kind.__name__}")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML, JSON and trackers)."""
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.config --config FILE [overrides] [--get section.key]`: print the resolved config as YAML,
    or one value of it (the SLURM scripts read train.run_dir this way)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Print a resolved training config, or one value of it.")
    parser.add_argument("--config", help="YAML experiment file")
    parser.add_argument("--get", metavar="SECTION.KEY", help="print only this value, e.g. train.run_dir")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.batch_size=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.get is None:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        value: Any = to_dict(cfg)
        for part in args.get.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(f"--get {args.get}: no such key")
            value = value[part]
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(value if not isinstance(value, dict) else yaml.safe_dump(value, sort_keys=False).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
