"""What a person reads while a run trains, on a terminal or in a log file (nohup, a redirect, Slurm's output).

On a terminal: a progress bar that moves every step, with messages printed above it. Elsewhere: one plain line per
logging interval (step, losses by group, throughput, data wait, ETA). Both: start-up lines and an end-of-run summary.
Only the main process prints; the other ranks' Console is silent (errors are main.py's, printed by every rank).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from tqdm import tqdm

if TYPE_CHECKING:
    from trainer.runtime.backends import Unit

GROUPS = {  # the terms of each loss shown on the console, by the name it is shown under
    "g": {"adv": ("adv_g_xy", "adv_g_yx"), "cycle": ("cycle_x", "cycle_y"), "idt": ("idt_x", "idt_y"),
          "preserve": ("preserve_x", "preserve_y"), "feature": ("feature_x", "feature_y"), "nce": ("nce_x", "nce_y")},
    "d": {"x": ("d_x",), "y": ("d_y",)},
}  # fmt: skip


def duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def loss_summary(logged: dict[str, float], unit: Unit) -> str:
    """`3.21 (adv 0.98, cycle 1.73, idt 0.51)`: a unit's total loss and its groups present in `logged`."""
    parts = []
    for name, terms in GROUPS[unit].items():
        values = [logged[f"loss/{term}"] for term in terms if f"loss/{term}" in logged]
        if values:
            parts.append(f"{name} {sum(values):.3g}")
    return f"{logged[f'loss/{unit}_total']:.4g} ({', '.join(parts)})"


class Console:
    """Start-up lines, progress and the summary of one run, on the main process only."""

    def __init__(self, is_main: bool, stream: TextIO | None = None):
        self.is_main = is_main
        self.stream = stream or sys.stdout
        self.bar: tqdm | None = None
        self.first_step, self.total, self.started = 0, 0, time.perf_counter()

    def message(self, text: str) -> None:
        """A line for the reader, above the bar when there is one."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def start(self, first_step: int, total: int) -> None:
        """Training begins after update `first_step` of `total`: the bar, on a terminal, from here on."""
        self.first_step, self.total, self.started = first_step, total, time.perf_counter()
        if self.is_main and self.stream.isatty():
            self.bar = tqdm(total=total, initial=first_step, desc="train", unit="step", file=self.stream)

    def step(self) -> None:
        """One update done (tqdm redraws at most every 0.1 s)."""
        if self.bar is not None:
            self.bar.update(1)

    def eta(self, step: int) -> str:
        """Time left at the mean step time since `start`."""
        done = step - self.first_step
        return duration((self.total - step) * (time.perf_counter() - self.started) / done) if done else "?"

    def interval(self, step: int, logged: dict[str, float]) -> None:
        """The losses of a logging interval: the bar's postfix on a terminal, else one line."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.set_postfix(g=f"{logged['loss/g_total']:.3g}", d=f"{logged['loss/d_total']:.3g}", refresh=False)
            return
        skipped = sum(logged.get(f"loss/nonfinite_{u}", 0.0) for u in ("g", "d"))
        line = (
            f"step {step}/{self.total} | g {loss_summary(logged, 'g')} | d {loss_summary(logged, 'd')} | "
            f"{logged['perf/images_per_s']:.1f} img/s | data wait {logged['perf/data_wait_fraction']:.0%} | "
            f"eta {self.eta(step)}" + (f" | skipped {skipped:.0f} non-finite updates" if skipped else "")
        )
        print(line, file=self.stream, flush=True)

    def spike(self, event: dict) -> None:
        """A loss spike that the tracker captured (see Tracker.capture_spikes)."""
        self.message(f"loss spike at step {event['step']} in {', '.join(event['terms'])}: saved {event['dir']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summary(self, step: int, images: int, metrics: dict[str, float], export: str | None) -> None:
        """The end of a run: steps, time and throughput, the last evaluation, and where the generators went."""
        self.close()
        elapsed = time.perf_counter() - self.started
        rate = f" ({images / elapsed:.1f} img/s)" if elapsed > 0 and images else ""
        word = "done" if step == self.total else "stopped"
        self.message(
            f"{word}: {step - self.first_step} steps in {duration(elapsed)}{rate}, at step {step}/{self.total}"
        )
        if metrics:
            shown = [
                f"{key[len('eval/') :]} {metrics[key]:.4g}"
                for key in ("eval/psnr_g_xy", "eval/psnr_g_yx", "eval/psnr_identity", "eval/cycle_l1_x",
                            "eval/cycle_l1_y", "eval/fid_y", "eval/fid_x")
                if key in metrics
            ]  # fmt: skip
            self.message(f"evaluation at step {step}: {', '.join(shown)}")
        if export:
            which = "g_xy: X->Y, g_yx: Y->X" if (Path(export) / "g_yx.safetensors").is_file() else "g_xy: X->Y"
            self.message(f"generators exported to {export} ({which}); translate images with")
            self.message(f"  python -m trainer.translate --weights {export} --direction x2y --input IMAGES --out OUT")
