"""Routing policies on the wire: what an operator (admin API, CLI, `--routing-file`) sets and
every scheduler reads.

A policy is stored as JSON in the `ROUTING_BUCKET` KV bucket under one of three entries:
`default`, `m.<model token>` (one model) or `k.<key token>` (one API key; it wins over the
model's, which wins over the default). Schedulers watch the bucket, so a change applies to
the next placement on every scheduler, without a restart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.subjects import model_id_from_token, model_token

STRATEGIES = ("most_free", "cheapest", "fastest", "own_first", "weighted", "failover")
DEFAULT_ENTRY = "default"
HISTORY = 5  # versions of each entry the bucket keeps (the audit log says who set them)
_FIELDS = {"strategy", "order", "weights", "spill_wait"}


@dataclass(frozen=True, slots=True)
class Policy:
    strategy: str = "most_free"
    order: tuple[str, ...] = ()  # failover order (and the tie order of the others)
    weights: tuple[tuple[str, float], ...] = ()  # weighted split
    spill_wait: float = 2.0  # own_first: seconds of predicted wait before spilling over

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """Raises ValueError with a message fit for a client on anything malformed."""
        if not isinstance(d, Mapping):
            raise ValueError("a routing policy must be an object")
        unknown = set(d) - _FIELDS
        if unknown:
            raise ValueError(f"unknown field(s) in a routing policy: {', '.join(sorted(map(str, unknown)))}")
        strategy = d.get("strategy", "most_free")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
        order = d.get("order") or []
        if not isinstance(order, list) or not all(isinstance(p, str) and p for p in order):
            raise ValueError("`order` must be a list of pool names")
        weights = d.get("weights") or {}
        if not isinstance(weights, Mapping) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in weights.values()
        ):
            raise ValueError("`weights` must map pool names to numbers >= 0")
        if strategy == "weighted" and not any(w > 0 for w in weights.values()):
            raise ValueError("the weighted strategy needs `weights` with at least one weight > 0")
        if strategy == "failover" and not order:
            raise ValueError("the failover strategy needs an `order` of pools")
        spill = d.get("spill_wait", 2.0)
        if isinstance(spill, bool) or not isinstance(spill, (int, float)) or not math.isfinite(spill) or spill < 0:
            raise ValueError("`spill_wait` must be a number of seconds >= 0")
        return cls(
            strategy=str(strategy),
            order=tuple(order),
            weights=tuple((str(k), float(v)) for k, v in weights.items()),
            spill_wait=float(spill),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.strategy}
        if self.order:
            out["order"] = list(self.order)
        if self.weights:
            out["weights"] = dict(self.weights)
        if self.strategy == "own_first" or self.spill_wait != 2.0:
            out["spill_wait"] = self.spill_wait
        return out

    def encode(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Policy:
        return cls.from_dict(json.loads(data))


def model_entry(model: str) -> str:
    return f"m.{model_token(model)}"


def key_entry(key_id: str) -> str:
    return f"k.{model_token(key_id)}"


def parse_entry(entry: str) -> tuple[str, str]:
    """("default", "") | ("model", model id) | ("key", key id); ValueError for anything else."""
    if entry == DEFAULT_ENTRY:
        return "default", ""
    scope, _, token = entry.partition(".")
    if scope in ("m", "k") and token:
        return ("model" if scope == "m" else "key"), model_id_from_token(token)
    raise ValueError(f"not a routing entry: {entry!r}")
