"""The one msgpack convention every record on the wire or in a bucket follows.

A record is a msgpack map with a version field `v`. `pack` writes it; `unpack` reads it
tolerantly (unknown keys are ignored, so a newer peer may add fields) and raises `WireError`
for bytes that are not such a map, or carry a version this code does not read; `need` reads a
required field. Whoever decodes a record logs a `WireError` and decides what to do with the
message: a decode failure is never silently turned into a default value.

Dataclass records whose fields are all plain values use `pack_fields` / `unpack_fields`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import msgpack

VERSION = 1

R = TypeVar("R")


class WireError(ValueError):
    """Bytes that are not a valid Tokenyard record."""


def pack(fields: dict[str, Any]) -> bytes:
    """A record's map, with the version added; a value msgpack cannot hold is a WireError."""
    try:
        return msgpack.packb({"v": VERSION, **fields}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:  # e.g. an integer beyond 64 bits
        raise WireError(f"cannot encode record: {e}") from e


def unpack(data: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise WireError(f"not msgpack: {e}") from e
    if not isinstance(obj, dict):
        raise WireError("record is not a map")
    version = obj.get("v", 0)
    if version != VERSION:
        raise WireError(f"unsupported record version {version!r}")
    return obj


def need(obj: dict[str, Any], key: str) -> Any:
    try:
        return obj[key]
    except KeyError as e:
        raise WireError(f"missing field {key!r}") from e


def pack_fields(record: Any) -> bytes:
    """A flat dataclass as a record, one map entry per field. Read field by field, not with
    `dataclasses.asdict`, whose deep copy was 2 % of the gateway's samples (a usage record per request)."""
    return pack({f.name: getattr(record, f.name) for f in dataclasses.fields(record)})


def unpack_fields(cls: type[R], data: bytes) -> R:
    """The dataclass `cls` from `pack_fields` bytes: unknown keys ignored, a missing required
    field or a value of the wrong kind a WireError."""
    obj = unpack(data)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**{k: v for k, v in obj.items() if k in names})
    except TypeError as e:
        raise WireError(f"bad {cls.__name__}: {e}") from e
