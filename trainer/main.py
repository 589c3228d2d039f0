"""Command line: `[accelerate launch] trainer/main.py --config configs/NAME.yaml [section.key=value ...]`."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (how `accelerate launch` runs it): Python put trainer/ itself first on sys.path, where
    # trainer/data/ or trainer/config/ would shadow same-named top-level packages. Use the repo root instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from trainer.runtime.process_exit import exit_process, peer_failure, record_early_signals  # noqa: E402

if __name__ == "__main__":
    record_early_signals()  # first: a preemption during the seconds of imports ends the run with its exit code

import argparse  # noqa: E402
import traceback  # noqa: E402

from trainer.config.checks import ConfigError
from trainer.config.load import load_config  # noqa: E402
from trainer.config.schema import section_summaries  # noqa: E402


def sections_epilog() -> str:
    """The --help text after the options: the config sections, and where their fields are listed."""
    width = max(map(len, section_summaries()))
    lines = [f"  {name:<{width}}  {summary}" for name, summary in section_summaries().items()]
    return (
        "config sections (set any field as section.key=value):\n" + "\n".join(lines) + "\n\nEvery field with its "
        "value: python -m trainer.config --config FILE [overrides]; their documentation: trainer/config/."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Train a CycleGAN, CUT or FastCUT (one process, or any accelerate launch: DDP, FSDP2, DeepSpeed).",
        epilog=sections_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML experiment file, e.g. configs/demo-cpu.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.batch_size=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if cfg.train.hang_timeout_s > 0:
        from trainer.runtime.watchdog import record_collectives

        record_collectives()  # for the watchdog's report; before the process group exists
    from trainer.checkpoint.format import CheckpointError
    from trainer.data.plan import DataError
    from trainer.observe.nonfinite import TrainingDiverged
    from trainer.observe.out_of_memory import OutOfMemory
    from trainer.observe.tracking import TrackingError
    from trainer.runtime.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE
    from trainer.runtime.run_lock import RunDirLocked
    from trainer.train import train

    try:
        result = train(cfg)
    except (ConfigError, CheckpointError, RunDirLocked, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (TrainingDiverged, DataError, OutOfMemory) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a quota, a permission: say which file, without a traceback
        print(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    if result.interrupted:
        return INTERRUPTED_EXIT_CODE
    return PREEMPTED_EXIT_CODE if result.preempted else 0


if __name__ == "__main__":
    try:
        status = main()
    except KeyboardInterrupt:  # Ctrl-C before training installed its handler: nothing to save yet
        print("interrupted before training started; nothing was saved", file=sys.stderr)
        status = 130
    except Exception as err:  # leave now, so that a launcher can restart us
        line = peer_failure(err)
        if line is None:  # a bug: its traceback
            traceback.print_exc()
        else:  # a collective whose peer died
            print(line, file=sys.stderr)
        status = 1
    exit_process(status)
