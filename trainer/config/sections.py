"""The run's other sections: optimizer, schedule, data, train, distributed, logging, eval, checkpoint, ema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shards.decode import DEFAULT_MAX_PIXELS
from trainer.config.checks import ConfigError, require


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW of each unit: learning rates, betas, clipping, the kernel, and scaling with the global batch."""

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
        require(self.lr > 0, "optimizer.lr", self.lr, "a number > 0")
        if self.lr_d is not None:
            require(self.lr_d > 0, "optimizer.lr_d", self.lr_d, "a number > 0 or null")
        require(0 <= self.beta1 < 1, "optimizer.beta1", self.beta1, "a number in [0, 1)")
        require(0 <= self.beta2 < 1, "optimizer.beta2", self.beta2, "a number in [0, 1)")
        require(self.eps > 0, "optimizer.eps", self.eps, "a number > 0")
        require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "a number >= 0")
        require(self.base_batch >= 1, "optimizer.base_batch", self.base_batch, "an integer >= 1")
        require(self.clip_grad_norm_g >= 0, "optimizer.clip_grad_norm_g", self.clip_grad_norm_g, "a number >= 0")
        require(self.clip_grad_norm_d >= 0, "optimizer.clip_grad_norm_d", self.clip_grad_norm_d, "a number >= 0")


@dataclass(kw_only=True)
class ScheduleConfig:
    """The learning-rate schedule: warm-up, then constant, linear or cosine decay."""

    kind: Literal["linear", "cosine", "constant"] = "linear"
    """linear: constant, then linear decay to zero at train.steps (the paper); cosine: cosine decay to zero."""
    warmup_steps: int = 0
    """Linear warmup from 0 to the full learning rate over this many steps."""
    decay_start: float = 0.5
    """For kind=linear: fraction of train.steps after which the linear decay starts (the paper: 100 of 200 epochs)."""

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps, "an integer >= 0")
        require(0 <= self.decay_start <= 1, "schedule.decay_start", self.decay_start, "a number in [0, 1]")


EXTRA_CHANNELS = {"none": 0, "hist": 24, "label": 1}
"""Generator input channels added by each per-sample extra (hist: 8 bins x RGB; label: one map)."""


@dataclass(kw_only=True)
class DataConfig:
    """Where the shards are and how samples are read, decoded, augmented and loaded."""

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
    x_bits: Literal[8, 16] | None = None
    """Bit depth of X's pixels, which are scaled to [-1, 1] from it. Null: the data's (its manifest records it; 8
    for shards without one). A value the data contradicts is an error."""
    y_bits: Literal[8, 16] | None = None
    """Bit depth of Y's pixels (see x_bits)."""
    shuffle_buffer: int = 256
    """Samples held in each (rank, worker, domain) shuffle buffer."""
    num_workers: int | Literal["auto"] = "auto"
    """Loader worker processes per rank; each reads its own part of the shards. auto: 1 on a CPU; on a GPU the
    rank's share of the CPUs less one, up to 8 (trainer.runtime.cpu_threads)."""
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
        require(self.crop_size >= 1, "data.crop_size", self.crop_size, "an integer >= 1")
        if self.crop_size > self.load_size:
            raise ConfigError(
                f"data.crop_size={self.crop_size} exceeds data.load_size={self.load_size}; "
                "lower crop_size or raise load_size"
            )
        require(0 <= self.rotation_deg <= 180, "data.rotation_deg", self.rotation_deg, "a number in [0, 180]")
        require(0 < self.scale_min <= 1, "data.scale_min", self.scale_min, "a number in (0, 1]")
        if self.load_size * self.scale_min < self.crop_size:
            raise ConfigError(
                f"data.scale_min={self.scale_min} shrinks data.load_size={self.load_size} below "
                f"data.crop_size={self.crop_size}; raise scale_min"
            )
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "an integer >= 1")
        require(self.num_workers == "auto" or self.num_workers >= 0, "data.num_workers", self.num_workers,
                "auto or an integer >= 0")  # fmt: skip
        require(0 <= self.max_bad_fraction <= 1, "data.max_bad_fraction", self.max_bad_fraction, "a number in [0, 1]")
        require(self.max_image_pixels >= 1, "data.max_image_pixels", self.max_image_pixels, "an integer >= 1")
        require(self.retries >= 0, "data.retries", self.retries, "an integer >= 0")
        require(self.retry_backoff_s >= 0, "data.retry_backoff_s", self.retry_backoff_s, "a number >= 0")
        require(self.io_timeout_s > 0, "data.io_timeout_s", self.io_timeout_s, "a number > 0")
        require(self.io_min_rate_kib_s >= 0, "data.io_min_rate_kib_s", self.io_min_rate_kib_s, "a number >= 0")
        require(self.cache_max_gb > 0, "data.cache_max_gb", self.cache_max_gb, "a number > 0")


@dataclass(kw_only=True)
class TrainConfig:
    """The run: steps, per-rank batch, run directory, seed, precision, resume and the speed levers."""

    steps: int = 1000
    """Optimizer updates of each unit."""
    batch_size: int = 1
    """Images of each domain per rank per step (the global batch is batch_size x world size)."""
    run_dir: str = "runs/default"
    """Where the resolved config, metrics.jsonl, image grids, checkpoints and exported weights go."""
    seed: int = 0
    """Seeds weights, data order, augmentation and the image pools."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """bf16/fp16 autocast the networks' forward passes (losses stay fp32); fp16 adds a loss scaler per unit; auto
    is bf16 where the GPU or CPU computes it natively, else fp32 (trainer.runtime.precision)."""
    cpu_threads: int | Literal["auto"] = "auto"
    """torch's threads in each rank. auto: the rank's share of the CPUs it may use (affinity mask, cgroup quota,
    OMP_NUM_THREADS, less CPUs other processes keep busy at start, split between the node's ranks), less its loader
    workers on a GPU (shards.cpu_budget). A CPU run's low bits follow the count: pin it to compare runs bit for bit."""
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
    hang_timeout_s: float = 480.0
    """Each rank's watchdog: when the loop enters or leaves no phase (data, generator step, evaluation, checkpoint,
    a collective, ...) for this long, the rank writes every thread's stack under RUN/diagnostics/, says which
    phase in one line and exits with the requeue code (trainer.runtime.watchdog). 0 turns it off. Below
    distributed.timeout_s, so that a peer's hang is reported before the collective times out."""

    def __post_init__(self) -> None:
        require(self.steps >= 1, "train.steps", self.steps, "an integer >= 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "an integer >= 1")
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", self.grad_accum_steps, "an integer >= 1")
        require(self.cpu_threads == "auto" or self.cpu_threads >= 1, "train.cpu_threads", self.cpu_threads,
                "auto or an integer >= 1")  # fmt: skip
        require(bool(self.run_dir), "train.run_dir", self.run_dir, "a non-empty path")
        require(self.seed >= 0, "train.seed", self.seed, "an integer >= 0")
        if self.pool_size is not None:
            require(self.pool_size >= 0, "train.pool_size", self.pool_size, "an integer >= 0 or null")
        require(self.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", self.max_nonfinite_steps, "an integer > 0")
        require(self.hang_timeout_s >= 0, "train.hang_timeout_s", self.hang_timeout_s, "a number of seconds >= 0")


@dataclass(kw_only=True)
class DistributedConfig:
    """How the units are shared across ranks (DDP, FSDP2, DeepSpeed ZeRO) and the collectives' limits."""

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
        require(self.timeout_s >= 1, "distributed.timeout_s", self.timeout_s, "an integer >= 1")
        require(self.bucket_cap_mb >= 1, "distributed.bucket_cap_mb", self.bucket_cap_mb, "an integer >= 1")
        require(
            self.fsdp_min_block_params >= 1, "distributed.fsdp_min_block_params", self.fsdp_min_block_params, ">= 1"
        )
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(f"distributed.offload_params=true needs distributed.zero_stage=3 (got {self.zero_stage})")


@dataclass(kw_only=True)
class LoggingConfig:
    """What the run reports and how often: console, metrics.jsonl, W&B, sample grids, loss spikes."""

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
    straggler_factor: float = 1.5
    """Warn when one rank's own time per update (outside the calls where ranks wait for each other) exceeds the
    median rank's by this factor in straggler_windows logging windows in a row; 0 never warns."""
    straggler_windows: int = 3
    """Logging windows in a row that the same rank must be slow in before the warning."""

    def __post_init__(self) -> None:
        require(
            self.wandb_init_timeout_s > 0, "logging.wandb_init_timeout_s", self.wandb_init_timeout_s, "a number > 0"
        )
        require(self.every_steps >= 1, "logging.every_steps", self.every_steps, "an integer >= 1")
        require(self.image_every_steps >= 0, "logging.image_every_steps", self.image_every_steps, "an integer >= 0")
        require(self.sample_images >= 1, "logging.sample_images", self.sample_images, "an integer >= 1")
        require(
            self.spike_factor == 0 or self.spike_factor > 1,
            "logging.spike_factor",
            self.spike_factor,
            "0 (off) or a number > 1",
        )
        require(self.spike_check_steps >= 1, "logging.spike_check_steps", self.spike_check_steps, "an integer >= 1")
        require(
            self.straggler_factor == 0 or self.straggler_factor > 1,
            "logging.straggler_factor",
            self.straggler_factor,
            "0 (off) or a number > 1",
        )
        require(self.straggler_windows >= 1, "logging.straggler_windows", self.straggler_windows, "an integer >= 1")


@dataclass(kw_only=True)
class EvalConfig:
    """The test-split evaluation: how often, how many images, FID/KID, best-checkpoint selection."""

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
        require(self.every_steps >= 0, "eval.every_steps", self.every_steps, "an integer >= 0")
        require(self.images >= 0, "eval.images", self.images, "an integer >= 0")
        require(self.batch_size >= 1, "eval.batch_size", self.batch_size, "an integer >= 1")
        require(self.kid_subset_size >= 2, "eval.kid_subset_size", self.kid_subset_size, "an integer >= 2")
        if self.select == "fid" and not self.inception_weights:
            raise ConfigError("eval.select=fid needs eval.inception_weights (a local TorchScript Inception file)")
        if self.select != "none" and self.images == 0:
            raise ConfigError(f"eval.select={self.select} needs eval.images > 0")


@dataclass(kw_only=True)
class CheckpointConfig:
    """When checkpoints are saved and kept, and how (in the background or not)."""

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
    remote: str = ""
    """A store URL (s3://bucket/prefix, gs://bucket/prefix) that every published checkpoint is uploaded to in the
    background, and the export, metrics.jsonl and config.yaml at the end; a run whose directory holds no newer
    checkpoint resumes from the store's newest complete one. Credentials and endpoint as for data.root."""
    remote_max_behind: int = 2
    """Say on the console when more than this many published checkpoints are not yet complete in the store."""
    remote_final_wait_s: float = 600.0
    """At the end of the run, wait at most this long for the uploads still running, then say what is missing."""

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "an integer >= 0")
        require(self.keep >= 1, "checkpoint.keep", self.keep, "an integer >= 1")
        require(self.keep_every_steps >= 0, "checkpoint.keep_every_steps", self.keep_every_steps, "an integer >= 0")
        require(
            self.preempt_check_steps >= 1, "checkpoint.preempt_check_steps", self.preempt_check_steps, "an integer >= 1"
        )
        require(self.remote_max_behind >= 1, "checkpoint.remote_max_behind", self.remote_max_behind, "an integer >= 1")
        require(
            self.remote_final_wait_s >= 0, "checkpoint.remote_final_wait_s", self.remote_final_wait_s, "a number >= 0"
        )


@dataclass(kw_only=True)
class EMAConfig:
    """The generators' exponential moving average, used for evaluation, sample grids and the export."""

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
        require(self.half_life_images >= 1, "ema.half_life_images", self.half_life_images, "an integer >= 1")
        require(self.rampup >= 0, "ema.rampup", self.rampup, "a number >= 0")
        if self.eval_raw and not self.enabled:
            raise ConfigError("ema.eval_raw=true needs ema.enabled=true: without an average, eval/ is of the raw ones")


@dataclass(kw_only=True)
class ProfileConfig:
    """A torch.profiler window: each rank's trace of a few updates under run_dir/traces/ (Perfetto, TensorBoard)."""

    steps: int = 0
    """Updates traced; 0: no profiling."""
    start_step: int = 10
    """The first update traced (the first ones warm up: allocator, cuDNN autotuning, compilation)."""
    memory: bool = False
    """Also record tensor shapes and allocations in the trace, and on CUDA the stack of every allocation for the
    memory snapshot an out-of-memory error writes (slower: only to find where memory goes)."""

    def __post_init__(self) -> None:
        require(self.steps >= 0, "profile.steps", self.steps, "an integer >= 0")
        require(self.start_step >= 1, "profile.start_step", self.start_step, "an integer >= 1")
