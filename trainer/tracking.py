"""Run tracking on the main process: metrics.jsonl, PNG sample grids, a tqdm progress bar and W&B through
Accelerate's tracker API. Every method is a no-op on the other ranks; nothing here knows about models."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from trainer.config import LoggingConfig


def image_grid(rows: list[list[torch.Tensor]]) -> np.ndarray:
    """Tile images [3, H, W] in [-1, 1] into one uint8 array [rows*H, cols*W, 3]."""
    tiles = [torch.cat([img.detach().float().cpu() for img in row], dim=2) for row in rows]
    grid = torch.cat(tiles, dim=1).clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return grid.permute(1, 2, 0).numpy()


class Tracker:
    """Writes what the main process logs to run_dir (always) and to W&B (unless disabled)."""

    def __init__(
        self,
        accelerator: Any,
        run_dir: Path,
        cfg: LoggingConfig,
        config: dict[str, Any],
        total_steps: int,
        resume_step: int = 0,
    ):
        self.is_main = accelerator.is_main_process
        self.accelerator = accelerator
        self.use_wandb = cfg.wandb != "disabled"
        self.run_dir = run_dir
        self.jsonl = None
        self.progress = None
        if not self.is_main:
            return
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        self.jsonl = self._open_jsonl(run_dir / "metrics.jsonl", resume_step)
        self.progress = tqdm(
            total=total_steps, initial=resume_step, desc="train", unit="step", disable=not sys.stderr.isatty()
        )
        if self.use_wandb:
            accelerator.init_trackers(
                cfg.project, config=config, init_kwargs={"wandb": {"mode": cfg.wandb, "dir": str(run_dir)}}
            )

    @staticmethod
    def _open_jsonl(path: Path, resume_step: int):
        """metrics.jsonl for appending: a fresh run starts it over; a resumed one drops what an interrupted run
        logged after the checkpoint, so the curve has each step once."""
        kept = []
        if resume_step > 0 and path.is_file():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write scalars for `step` (number of updates done) to metrics.jsonl and W&B."""
        if not self.is_main:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.use_wandb:
            self.accelerator.log(metrics, step=step)

    def advance(self, steps: int, postfix: dict[str, float]) -> None:
        """Move the progress bar."""
        if self.is_main:
            self.progress.update(steps)
            self.progress.set_postfix({k: f"{v:.3g}" for k, v in postfix.items()}, refresh=False)

    def log_images(self, step: int, grids: dict[str, np.ndarray]) -> None:
        """Save each grid as run_dir/images/<name>_<step>.png and log it to W&B."""
        if not self.is_main:
            return
        for name, grid in grids.items():
            Image.fromarray(grid).save(self.run_dir / "images" / f"{name}_{step:08d}.png")
        if self.use_wandb:
            import wandb

            self.accelerator.log({f"images/{n}": wandb.Image(g) for n, g in grids.items()}, step=step)

    def close(self) -> None:
        if self.is_main:
            self.progress.close()
            self.jsonl.close()
