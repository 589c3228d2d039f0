"""ConfigError and the checks every config section shares: one line naming the key, the value (shown bounded)
and what is allowed."""

from __future__ import annotations

import dataclasses
import reprlib
from typing import Any


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names the key and what is allowed."""


_SHORT = reprlib.Repr()

_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 80, 80


def show(value: Any) -> str:
    """repr of a value for an error message, bounded in size whatever the value (aliases share structure)."""
    return _SHORT.repr(value)


def field_defaults(cls: type) -> dict[str, Any]:
    """The default of each field of dataclass `cls` that has a plain one, by name."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def refuse_unused(section: Any, prefix: str, names: tuple[str, ...], family: str) -> None:
    """Refuse a CUT/FastCUT field among `names` of `section` set away from its default under `family`."""
    defaults = field_defaults(type(section))
    for name in names:
        if getattr(section, name) != defaults[name]:
            raise ConfigError(
                f"{prefix}{name}={show(getattr(section, name))} is a CUT/FastCUT setting; model.family={family} "
                "does not use it"
            )


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={show(value)} is not allowed; expected {allowed}")
