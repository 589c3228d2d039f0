"""Run tracking on the main process: metrics.jsonl, PNG sample grids, loss-spike captures (observe.spikes) and W&B
through Accelerate's tracker API (the console is observe.console's). Every method is a no-op on the other ranks;
nothing here knows about models.

Resuming continues the same W&B run (its id is kept in the checkpoints) and never logs a step at or below the
last one W&B already has, so its step axis only goes forward.

W&B failing never ends a run with a traceback: an online run that cannot start within logging.wandb_init_timeout_s
(no API key, a server that refuses or never answers) goes on offline, and a failure during the run (its service
process gone) goes on without W&B, each said in one line; with logging.wandb_fallback=stop either is a one-line
TrackingError instead.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shards.encoding import png_bytes
from trainer.config.checks import ConfigError
from trainer.config.sections import LoggingConfig
from trainer.observe.spikes import SpikeCapture
from trainer.runtime.run_files import open_append, write_atomic, write_file

WANDB_LAST_STEP = ".wandb_last_step"


class TrackingError(RuntimeError):
    """W&B failed and logging.wandb_fallback=stop (or an offline run could not start): one line saying why."""


def _gist(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def git_commit() -> str:
    """The commit of the code being run ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def wandb_init_kwargs(cfg: LoggingConfig, run_dir: Path, run_id: str | None) -> dict[str, Any]:
    """wandb.init arguments: the config's values where set (else W&B reads its WANDB_* variables)."""
    kwargs: dict[str, Any] = {"mode": cfg.wandb, "dir": str(run_dir)}
    for key, value in (("entity", cfg.entity), ("name", cfg.run_name), ("group", cfg.group)):
        if value:
            kwargs[key] = value
    if cfg.tags:
        kwargs["tags"] = [tag.strip() for tag in cfg.tags.split(",") if tag.strip()]
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    return kwargs


def _parse_record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl record, or None for a line that is not one (torn by an interrupted write)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class Tracker:
    """Writes what the main process logs to run_dir (always) and to W&B (unless disabled)."""

    def __init__(
        self,
        accelerator: Any,
        run_dir: Path,
        cfg: LoggingConfig,
        config: dict[str, Any],
        resume_step: int = 0,
        wandb_run_id: str | None = None,
    ):
        self.is_main = accelerator.is_main_process
        self.accelerator = accelerator
        self.use_wandb = cfg.wandb != "disabled"
        self.wandb_mode, self.wandb_fallback = cfg.wandb, cfg.wandb_fallback
        self.run_dir = run_dir
        self.jsonl = None
        self.wandb_run_id: str | None = None
        self.wandb_floor = -1
        self.steps_redone = 0
        self.spikes = None
        if not self.is_main:
            return
        (run_dir / "images").mkdir(parents=True, exist_ok=True)
        self.jsonl, last_logged = self._open_jsonl(run_dir / "metrics.jsonl", resume_step)
        self.steps_redone = max(0, last_logged - resume_step)
        if cfg.spike_factor > 0:
            self.spikes = SpikeCapture(run_dir, cfg.spike_factor, cfg.spike_check_steps)
        if self.use_wandb:
            self._start_wandb(cfg, {**config, "git_commit": git_commit()}, wandb_run_id)
            floor_file = run_dir / WANDB_LAST_STEP
            if wandb_run_id and floor_file.is_file():
                text = floor_file.read_text(errors="replace").strip()
                self.wandb_floor = int(text) if text.isdigit() else -1

    def _start_wandb(self, cfg: LoggingConfig, config: dict[str, Any], run_id: str | None) -> None:
        """Start the W&B run through accelerate's tracker, offline when online fails and the fallback allows it.

        Raises:
            ConfigError: the wandb package is missing.
            TrackingError: W&B did not start and may not fall back (one line).
        """
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                f"logging.wandb={cfg.wandb} needs the wandb package; install it or set logging.wandb=disabled"
            ) from None
        project = cfg.project or os.environ.get("WANDB_PROJECT") or "cyclegan-dist"
        kwargs = {
            **wandb_init_kwargs(cfg, self.run_dir, run_id),
            "settings": wandb.Settings(init_timeout=cfg.wandb_init_timeout_s),
        }
        failed = self._init_wandb(project, config, kwargs)
        if failed and cfg.wandb == "online" and cfg.wandb_fallback == "offline":
            offline = self.run_dir / "wandb"
            print(
                f"warning: W&B did not start online ({failed}); logging offline to {offline} instead: upload it with "
                f"`wandb sync {offline}/offline-run-*` once W&B is reachable (logging.wandb_fallback=stop makes "
                "this an error)",
                flush=True,
            )
            self.wandb_mode = "offline"
            failed = self._init_wandb(project, config, {**kwargs, "mode": "offline"})
        if failed:
            instead = "logging.wandb_fallback=offline to go on offline, or " if self.wandb_mode == "online" else ""
            raise TrackingError(
                f"logging.wandb={self.wandb_mode}: W&B did not start ({failed}); set {instead}logging.wandb=disabled "
                "to train without it"
            )
        self.wandb_run_id = self.accelerator.get_tracker("wandb", unwrap=True).id

    def _init_wandb(self, project: str, config: dict[str, Any], kwargs: dict[str, Any]) -> str | None:
        """accelerator.init_trackers for W&B. Returns None, or why it failed (the tracker is then removed)."""
        try:
            self.accelerator.init_trackers(project, config=config, init_kwargs={"wandb": kwargs})
        except Exception as err:  # no API key, a refused or silent server, init_timeout: W&B's errors or OSErrors
            self._forget_wandb()
            return _gist(err)
        return None

    def _forget_wandb(self) -> None:
        """Drop accelerate's W&B tracker, so that neither logging nor end_training reaches W&B again."""
        self.accelerator.trackers = [t for t in self.accelerator.trackers if t.name != "wandb"]

    def _wandb_failed(self, what: str, err: Exception) -> None:
        """A W&B call during the run failed: go on without W&B, saying so, or stop (logging.wandb_fallback).

        Raises:
            TrackingError: with logging.wandb_fallback=stop.
        """
        self.use_wandb = False
        self._forget_wandb()
        try:  # stop W&B's service connection now, or its exit hook prints a traceback for the same failure
            import wandb

            wandb.teardown()
        except Exception:
            pass  # it failed the same way: nothing more to say
        reason = f"W&B failed {what} ({_gist(err)})"
        if self.wandb_fallback == "stop":
            raise TrackingError(f"logging.wandb={self.wandb_mode}: {reason}; logging.wandb_fallback=stop") from None
        print(
            f"warning: {reason}; going on without W&B ({self.run_dir}/metrics.jsonl has every step; "
            "logging.wandb_fallback=stop makes this an error)",
            flush=True,
        )

    @staticmethod
    def _open_jsonl(path: Path, resume_step: int) -> tuple[Any, int]:
        """metrics.jsonl for appending, and the last step it had logged: a fresh run starts it over; a resumed one
        drops what an interrupted run logged after the checkpoint, so the curve has each step once, and lines torn
        by a crash or a full disk."""
        kept, torn, last = [], 0, 0
        if resume_step > 0 and path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                record = _parse_record(line)
                if record is None:
                    torn += 1
                    continue
                last = max(last, record["step"])
                if record["step"] <= resume_step:
                    kept.append(line)
        if torn:
            print(f"{path}: dropped {torn} torn line(s) that an interrupted write left")
        write_atomic(path, "".join(line + "\n" for line in kept))
        return os.fdopen(open_append(path), "a"), last

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Write scalars for `step` (number of updates done) to metrics.jsonl and W&B."""
        if not self.is_main:
            return
        try:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self.jsonl.flush()
        except OSError as err:  # a full disk: name the file (a write error names none)
            raise OSError(err.errno, err.strerror, self.jsonl.name) from None
        self._to_wandb(step, metrics)

    def _to_wandb(self, step: int, values: dict[str, Any]) -> None:
        if not self.use_wandb or step <= self.wandb_floor:
            return  # W&B already has this step from the run before the resume
        try:
            self.accelerator.log(values, step=step)
        except Exception as err:  # e.g. its service process ended: ConnectionResetError
            self._wandb_failed(f"at step {step}", err)
            return
        write_atomic(self.run_dir / WANDB_LAST_STEP, str(step))

    def log_images(self, step: int, grids: dict[str, np.ndarray]) -> None:
        """Save each grid as run_dir/images/<name>_<step>.png and log it to W&B."""
        if not self.is_main:
            return
        for name, grid in grids.items():
            write_file(self.run_dir / "images" / f"{name}_{step:08d}.png", png_bytes(grid))
        if self.use_wandb:
            import wandb

            self._to_wandb(step, {f"images/{n}": wandb.Image(g) for n, g in grids.items()})

    def capture_spikes(
        self, step: int, stats: dict[str, torch.Tensor], images: dict[str, torch.Tensor]
    ) -> list[dict[str, Any]]:
        """Buffer update `step`'s loss terms (the loss/ keys of `stats`) and images for loss-spike capture
        (logging.spike_factor; see trainer.observe.spikes) and log the spikes found (spike/step, spike/terms).

        Returns:
            One event {step, dir, terms} per spiking step found now (none off the main process).
        """
        if self.spikes is None:
            return []
        events = self.spikes.add(step, {k: v for k, v in stats.items() if k.startswith("loss/")}, images)
        for event in events:
            self.log(step, {"spike/step": event["step"], "spike/terms": len(event["terms"])})
        return events

    def close(self) -> None:
        """Close metrics.jsonl and finish the W&B run (before the engine ends: a failure here follows the fallback)."""
        if not self.is_main:
            return
        self.jsonl.close()
        if self.use_wandb:
            try:
                self.accelerator.get_tracker("wandb").finish()
            except Exception as err:
                self._wandb_failed("to finish the run", err)
            self._forget_wandb()
