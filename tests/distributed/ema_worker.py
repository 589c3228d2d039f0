"""EMA harness, run under `accelerate launch` (any backend): trains the worker's tiny CycleGAN 3 steps with a
short-lived moving average, then compares G's output on a probe image inside Engine.ema_weights() (what evaluation
sees) with a plain generator built from the gathered average (what checkpoints and exports hold), and the output
after the block with the one before it (the raw weights restored). Rank r writes OUT/rank<r>.json.

    python tests/distributed/ema_worker.py OUT [section.key=value ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[2])  # run as a script: import tests.* from the repo root
from tests.distributed.worker import SIZE, TINY  # noqa: E402
from trainer.build import build_training  # noqa: E402
from trainer.config.load import load_config  # noqa: E402
from trainer.models import build_generator  # noqa: E402
from trainer.runtime.engine import EMA_UNIT, Engine  # noqa: E402
from trainer.runtime.process_exit import exit_process  # noqa: E402
from trainer.train import train_step  # noqa: E402

EMA = ["ema.enabled=true", "ema.half_life_images=2", "ema.rampup=0", "train.batch_size=2"]


def main(out: Path, overrides: list[str]) -> None:
    cfg = load_config(None, [*TINY, *EMA, *overrides])
    engine = Engine(cfg.distributed, cfg.train, cfg.optimizer)
    run = build_training(cfg, engine)  # with the EMA (ema.enabled)
    global_batch = run.global_batch
    data = torch.Generator().manual_seed(0)
    for step in range(1, 4):
        xs = torch.rand(2, 3, SIZE, SIZE, generator=data) * 2 - 1
        train_step(run, [{"x": xs.to(engine.device), "y": xs.flip(0).to(engine.device)}])
        engine.update_ema(step * global_batch, global_batch)
    probe = (torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 2 - 1).to(engine.device)
    gens = engine.unwrap("g")
    with torch.no_grad():
        before = gens.g_xy(probe)
        with engine.ema_weights():
            seen = gens.g_xy(probe)
        after = gens.g_xy(probe)
    average = engine.universal_state(EMA_UNIT)
    plain = build_generator(cfg.model)
    plain.load_state_dict({k[len("g_xy.") :]: v for k, v in average.items() if k.startswith("g_xy.")})
    with torch.no_grad():
        expected = plain.to(engine.device)(probe)
    facts = {
        "backend": engine.backend_name,
        "seen_vs_average": (seen - expected).abs().max().item(),
        "raw_vs_average": (before - expected).abs().max().item(),
        "restored": torch.equal(before, after),
    }
    (out / f"rank{engine.rank}.json").write_text(json.dumps(facts))
    engine.end()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
    exit_process(0)
