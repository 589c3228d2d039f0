"""Loading a complete checkpoint into the engine and this rank's state, whatever backend or world size wrote it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from trainer.checkpoint.format import MOMENTS, UNIVERSAL, CheckpointError, rank_file, read_train_state
from trainer.checkpoint.state_file import load_state_file
from trainer.runtime.engine import EMA_UNIT, Engine


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _units_state(path: Path, engine: Engine) -> dict[str, dict[str, torch.Tensor]]:
    """units.safetensors split by unit, checked against this run's units (names and full shapes), in loading
    order. A checkpoint written without the generators' moving average lacks EMA_UNIT.

    Raises:
        CheckpointError: an unreadable file, or tensors missing or of another shape.
    """
    try:
        universal = load_file(str(path / UNIVERSAL))
    except Exception as err:  # safetensors' own error type for a malformed file
        raise CheckpointError(f"checkpoint {path}: {UNIVERSAL} is unreadable ({err!s:.120})") from None
    units = {}
    for unit in engine.checkpoint_units:
        prefix = f"{unit}/"
        state = {k[len(prefix) :]: v for k, v in universal.items() if k.startswith(prefix)}
        if unit == EMA_UNIT and not state:
            continue
        expected = engine.full_shapes(unit)
        if "__step__" in state:
            params = [name for name, _ in engine.unwrap(unit).named_parameters()]
            expected.update({f"{name}{m}": expected[name] for name in params for m in MOMENTS})
        wrong = sorted(k for k in expected if k not in state or tuple(state[k].shape) != expected[k])
        if wrong:
            got = tuple(state[wrong[0]].shape) if wrong[0] in state else "missing"
            raise CheckpointError(
                f"checkpoint {path}: {UNIVERSAL} does not fit this run's {unit} unit ({len(wrong)} tensors missing "
                f"or of another shape, e.g. {unit}/{wrong[0]}: {got}, expected {expected[wrong[0]]})"
            )
        units[unit] = state
    return units


def load_checkpoint(
    engine: Engine, path: Path, report: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Restore the units, optimizers, schedulers, scalers and RNG from `path` (a collective).

    units.safetensors is re-partitioned onto this run's backend and world size (bitwise what was saved). On the
    world size and backend that wrote it, each rank also gets back its own state file (pools, data position, RNG),
    so the run continues exactly; otherwise rank 0's schedulers and data position are used.

    Returns:
        (train_state.json, this rank's state; after a topology change only {"data": rank 0's data position},
        from which the data plan restarts at the epoch, and the image pools start empty).

    Raises:
        CheckpointError: files missing, unreadable or not fitting this run.
    """
    train_state = read_train_state(path)
    same = train_state["world_size"] == engine.world_size and train_state["backend"] == engine.backend_name
    source = path / rank_file(engine.rank if same else 0)
    if not source.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {source.name}: it was written by an earlier version of cyclegan-dist; "
            "export its generators with `python -m trainer.export`, or resume from a newer checkpoint"
        )
    try:
        state = load_state_file(source)
    except ValueError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from None
    units = _units_state(path, engine)
    for unit, unit_state in units.items():
        engine.load_universal_state(unit, unit_state)
    if engine.ema is not None and EMA_UNIT not in units:
        engine.restart_ema()
        report(f"{path} holds no moving average of the generators: it starts from their loaded weights")
    try:
        engine_state = state["engine"]
        if train_state["backend"] != engine.backend_name:  # loss scalers of another backend: start afresh
            engine_state = {**engine_state, "scalers": {}}
        engine.load_state_dict(engine_state)
        if same:
            _set_rng_state(state["rng"], engine.device)
            return train_state, state
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path}: {source.name} is malformed ({type(err).__name__}: {err})") from None
    report(
        f"resuming {path} (written by {train_state['world_size']} x {train_state['backend']}) on "
        f"{engine.world_size} x {engine.backend_name}: weights and optimizer state re-partitioned, "
        "image pools empty, data from the start of the epoch"
    )
    return train_state, {"data": state["data"]}
