"""API keys of the provider config: `{env: VAR}`, `{file: path}` or (with a warning) a literal.

Keys are resolved per provider: the shape of every provider's `api_keys` is checked with the
rest of the file, but a key that cannot be read (an unset variable, an unreadable file) is an
error only for the adapter of that provider (`ProvidersConfig.get`), so one file serves every
adapter and each runs with only its own provider's keys. A key is never logged or shown: its
`Secret` prints as an 8-hex fingerprint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

from worker.config_shape import ProviderConfigError, mapping, only


def fingerprint(key: str) -> str:
    """A short, stable, non-reversible name for an API key, safe to log."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


class Secret:
    """An API key. Its repr and str show only the fingerprint, so logging a config object
    or an exception that holds one never prints the key."""

    __slots__ = ("_value", "fingerprint")

    def __init__(self, value: str) -> None:
        self._value = value
        self.fingerprint = fingerprint(value)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.fingerprint})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def provider_keys(
    value: Any, where: str, env: Mapping[str, str], read_secret: Callable[[str], str], warnings: list[str]
) -> tuple[tuple[Secret, ...], str]:
    """(keys, "") or ((), why not): the shape of the list is checked here (a mistake in it is an
    error for every adapter); a key that cannot be read only for the adapter that needs it."""
    _check_key_specs(value, where)
    try:
        return _keys(value, where, env, read_secret, warnings), ""
    except ProviderConfigError as e:
        return (), str(e)


def _check_key_specs(value: Any, where: str) -> None:
    if not isinstance(value, list) or not value:
        raise ProviderConfigError(f"{where}: needs at least one key, e.g. [{{env: MY_PROVIDER_KEY}}]")
    for i, item in enumerate(value):
        if isinstance(item, str):
            continue
        here = f"{where}[{i}]"
        d = mapping(item, here)
        only(d, ("env", "file"), here)
        if len(d) != 1:
            raise ProviderConfigError(f"{here}: give exactly one of 'env' or 'file'")


def _keys(
    value: Any, where: str, env: Mapping[str, str], read_secret: Callable[[str], str], warnings: list[str]
) -> tuple[Secret, ...]:
    if not isinstance(value, list) or not value:
        raise ProviderConfigError(f"{where}: needs at least one key, e.g. [{{env: MY_PROVIDER_KEY}}]")
    keys: list[Secret] = []
    for i, item in enumerate(value):
        here = f"{where}[{i}]"
        if isinstance(item, str):
            warnings.append(f"{here}: a literal key in the config file; prefer {{env: VAR}} or {{file: path}}")
            raw = item
        else:
            d = mapping(item, here)
            only(d, ("env", "file"), here)
            if len(d) != 1:
                raise ProviderConfigError(f"{here}: give exactly one of 'env' or 'file'")
            if "env" in d:
                var = d["env"]
                if not isinstance(var, str) or not var:
                    raise ProviderConfigError(f"{here}.env: must name an environment variable")
                if var not in env or not env[var].strip():
                    raise ProviderConfigError(
                        f"{here}: environment variable {var} is not set or empty; export it for this adapter"
                    )
                raw = env[var]
            else:
                name = d["file"]
                if not isinstance(name, str) or not name:
                    raise ProviderConfigError(f"{here}.file: must be a path")
                try:
                    raw = read_secret(name)
                except OSError as e:
                    raise ProviderConfigError(f"{here}: cannot read key file {name!r}: {e.strerror or e}") from e
        key = raw.strip()
        if not key:
            raise ProviderConfigError(f"{here}: the key is empty")
        if any(c.isspace() or ord(c) < 32 for c in key):
            raise ProviderConfigError(f"{here}: the key holds whitespace or control characters")
        secret = Secret(key)
        if secret in keys:
            warnings.append(f"{here}: the same key as an earlier entry (fingerprint {secret.fingerprint})")
            continue
        keys.append(secret)
    return tuple(keys)
