"""Resume-matrix harness, run directly or under `accelerate launch` (any backend, any world size):

    python tests/distributed/resume_worker.py save DIR [section.key=value ...]
        trains STEPS updates of the worker's tiny CycleGAN, saves a real checkpoint with trainer.checkpoint into
        DIR/run, then takes one more step and writes DIR/next.json: that step's losses and, under DDP, the weights
        after it.
    python tests/distributed/resume_worker.py resume OUT CHECKPOINT... [section.key=value ...]
        for each checkpoint in turn: loads it into this launch's backend and world size, records the step it
        continues from, the schedulers' position and the weights it got, takes one step and records its losses;
        rank 0 writes everything to OUT (torch.save of plain tensors).

Update k trains on a fixed global batch of GLOBAL images per domain; rank r of W takes images [r * GLOBAL / W,
(r + 1) * GLOBAL / W), so every topology sees the same images at every step. The generators' moving average
(trainer.runtime.ema, a short half-life) is on: it is saved, loaded and compared like the units. In save mode the worker
also keeps a reference average of the full weights and writes how far the backend's average (kept on whatever part
of the weights each rank holds) is from it, and each rank's sum of its average.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a script: import tests.* from the repo root
from tests.distributed.worker import SIZE, TINY  # noqa: E402
from trainer.build import Training, build_training  # noqa: E402
from trainer.checkpoint.load import load_checkpoint  # noqa: E402
from trainer.checkpoint.save import SaveRequest, save_checkpoint  # noqa: E402
from trainer.config.load import load_config  # noqa: E402
from trainer.runtime.ema import ema_beta  # noqa: E402
from trainer.runtime.engine import EMA_UNIT, UNITS, Engine  # noqa: E402
from trainer.runtime.process_exit import exit_process  # noqa: E402
from trainer.train import train_step  # noqa: E402

STEPS = 2
GLOBAL = 4
EMA = ["ema.enabled=true", "ema.half_life_images=4", "ema.rampup=0"]


def batch(step: int, engine: Engine) -> list[dict[str, torch.Tensor]]:
    """This rank's share of update `step`'s global batch (1-based), as one micro-batch."""
    data = torch.Generator().manual_seed(1000 + step)
    xs = torch.rand(GLOBAL, 3, SIZE, SIZE, generator=data) * 2 - 1
    ys = torch.rand(GLOBAL, 3, SIZE, SIZE, generator=data) * 2 - 1
    share = GLOBAL // engine.world_size
    rows = slice(engine.rank * share, (engine.rank + 1) * share)
    return [{"x": xs[rows].to(engine.device), "y": ys[rows].to(engine.device)}]


def step_losses(run: Training, step: int) -> dict[str, float]:
    """Take update `step` (and the moving average's update); its losses averaged over the ranks (equal shares:
    the global batch's mean)."""
    engine = run.engine
    stats, _ = train_step(run, batch(step, engine))
    engine.update_ema(step * GLOBAL, GLOBAL)
    return engine.reduce({k: stats[k] for k in ("loss/g_total", "loss/d_total")})


def saved_units(engine: Engine) -> dict[str, dict[str, torch.Tensor]]:
    return {u: engine.universal_state(u) if u == EMA_UNIT else engine.full_state_dict(u) for u in (*UNITS, EMA_UNIT)}


def main(mode: str, target: str, args: list[str]) -> None:
    checkpoints = [a for a in args if "=" not in a]
    # A schedule that changes the LR at every step: a resume must continue it, not restart it.
    schedule = ["schedule.kind=linear", "schedule.decay_start=0", "train.steps=50"]
    overrides = [*TINY, *schedule, *EMA, f"train.batch_size={GLOBAL}", *[a for a in args if "=" in a]]
    cfg = load_config(None, overrides)
    engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
    assert GLOBAL % engine.world_size == 0
    run = build_training(cfg, engine)  # with the EMA (ema.enabled)
    if mode == "save":
        reference = engine.full_state_dict("g")  # the average of the full weights, computed here by hand
        for step in range(1, STEPS + 1):
            step_losses(run, step)
            weight = 1 - ema_beta(cfg.ema, step * GLOBAL, GLOBAL)
            for name, value in engine.full_state_dict("g").items():
                reference[name] = reference[name].lerp(value, weight)
        ema = engine.universal_state(EMA_UNIT)
        ema_error = max((ema[name] - value).abs().max().item() for name, value in reference.items())
        local = torch.stack([part.double().sum() for part in engine.ema.average]).to(engine.device)
        rank_sums = engine.accelerator.gather(local[None]).tolist()
        local_share = sum(p.numel() for p in engine.ema.average) / sum(v.numel() for v in reference.values())
        save_checkpoint(engine, SaveRequest(Path(target) / "run", STEPS, {"data": {}}, {"model": None}, keep=1))
        losses = step_losses(run, STEPS + 1)
        after = saved_units(engine)
        if engine.is_main:
            facts = {"backend": engine.backend_name, "ema_error": ema_error, "ema_rank_sums": rank_sums,
                     "ema_local_share": local_share}  # fmt: skip
            (Path(target) / "next.json").write_text(json.dumps({**losses, **facts}))
            torch.save(after, Path(target) / "after.pt")
    else:
        results = []
        for checkpoint in checkpoints:
            train_state, _ = load_checkpoint(engine, Path(checkpoint))
            loaded = saved_units(engine)
            positions = {u: engine.schedulers[u].last_epoch for u in UNITS}
            losses = step_losses(run, train_state["step"] + 1)
            after = saved_units(engine)
            results.append(
                {"source": checkpoint, "step": train_state["step"], "schedulers": positions, "loaded": loaded,
                 "losses": losses, "after": after}
            )  # fmt: skip
        if engine.is_main:
            torch.save({"backend": engine.backend_name, "world": engine.world_size, "results": results}, target)
    engine.end()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    exit_process(0)
