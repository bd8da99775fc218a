"""Checks of a decoded config's shape that name the place of a mistake, and the error they raise.

Shared by the provider config (`worker.providers`) and its keys (`worker.provider_keys`): every
message names the field (`provider 'openai'.timeouts.read`) and says what would be right.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class ProviderConfigError(ValueError):
    """The provider config is invalid; the message names the place and the fix."""


EXIT_CONFIG = 2  # a worker's exit code for a config it cannot run with


def mapping(value: Any, where: str) -> dict[Any, Any]:
    if not isinstance(value, Mapping):
        raise ProviderConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def only(d: Mapping[Any, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise ProviderConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})")


def whole(value: Any, where: str, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ProviderConfigError(f"{where}: must be a whole number >= {minimum}, not {value!r}")
    return value


def number(value: Any, where: str, *, minimum: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < minimum:
        raise ProviderConfigError(f"{where}: must be a number >= {minimum:g}, not {value!r}")
    return float(value)


def flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ProviderConfigError(f"{where}: must be true or false, not {value!r}")
    return value
