"""Loss-spike capture: when a loss term jumps beyond `factor` x its running median, save that step's input images,
generator outputs and losses to RUN/spikes/step_XXXXXXXX/ - the step users most want to look at afterwards.

Steps are buffered on the device (references, no copies) and checked `check_steps` at a time, so the capture costs
one host sync per `check_steps` steps, not one per step.
"""

from __future__ import annotations

import io
import json
import statistics
from collections import deque
from pathlib import Path

import torch

from shards.encoding import png_bytes
from trainer.observe.grids import image_grid
from trainer.runtime.run_files import write_file

MIN_HISTORY = 10  # values of a term seen before it can spike


class SpikeCapture:
    """Buffers (step, loss terms, images) and reports the steps whose terms spiked."""

    def __init__(self, run_dir: Path, factor: float, check_steps: int, history: int = 200):
        self.root = run_dir / "spikes"
        self.factor = factor
        self.check_steps = check_steps
        self.pending: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.history: dict[str, deque] = {}
        self.history_size = history

    def add(self, step: int, losses: dict[str, torch.Tensor], images: dict[str, torch.Tensor]) -> list[dict]:
        """Buffer one step; every `check_steps` steps, check the buffer and return one event per spiking step.
        The images are copied: under CUDA graphs (train.compile_mode=reduce-overhead) the next step reuses the
        memory of this step's generator outputs."""
        self.pending.append((step, losses, {name: image.clone() for name, image in images.items()}))
        if len(self.pending) < self.check_steps:
            return []
        pending, self.pending = self.pending, []
        names = sorted(pending[0][1])
        values = torch.stack([torch.stack([p[1][n].float() for n in names]) for p in pending]).cpu().tolist()
        events = []
        for (step, _, images), row in zip(pending, values):
            spiking = {}
            for name, value in zip(names, row):
                seen = self.history.setdefault(name, deque(maxlen=self.history_size))
                if len(seen) >= MIN_HISTORY:
                    median = statistics.median(seen)
                    if median > 0 and value > self.factor * median:
                        spiking[name] = {"value": value, "median": median}
                seen.append(value)
            if spiking:
                events.append(self._save(step, dict(zip(names, row)), spiking, images))
        return events

    def _save(self, step: int, losses: dict, spiking: dict, images: dict[str, torch.Tensor]) -> dict:
        out = self.root / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        grids = {"x_to_y": ("real_x", "fake_y", "rec_x"), "y_to_x": ("real_y", "fake_x", "rec_y")}
        for name, keys in grids.items():  # the images the family's generators made (CUT: x | G(x))
            columns = [images[key] for key in keys if key in images]
            if len(columns) > 1:
                write_file(out / f"{name}.png", png_bytes(image_grid([list(row) for row in zip(*columns)])))
        tensors = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in images.items()}, tensors)
        write_file(out / "tensors.pt", tensors.getvalue())
        write_file(out / "losses.json", json.dumps({"step": step, "losses": losses, "spiking": spiking}, indent=2))
        return {"step": step, "dir": str(out), "terms": sorted(spiking)}
