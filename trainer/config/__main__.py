"""`python -m trainer.config --config FILE [overrides] [--get section.key]`: the resolved config, or one value."""

from __future__ import annotations

from typing import Any

import yaml

from trainer.config.checks import ConfigError
from trainer.config.load import load_config, to_dict


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.config --config FILE [overrides] [--get section.key]`: print the resolved config as YAML,
    or one value of it (the SLURM scripts read train.run_dir this way)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Print a resolved training config, or one value of it.")
    parser.add_argument("--config", help="YAML experiment file")
    parser.add_argument("--get", metavar="SECTION.KEY", help="print only this value, e.g. train.run_dir")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.batch_size=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.get is None:
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        value: Any = to_dict(cfg)
        for part in args.get.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(f"--get {args.get}: no such key")
            value = value[part]
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    print(value if not isinstance(value, dict) else yaml.safe_dump(value, sort_keys=False).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
