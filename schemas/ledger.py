"""The ledger role's query protocol: what a gateway asks (`LedgerQuery`) and one page of the
answer (`LedgerPage`), over NATS request/reply on `subjects.LEDGER_QUERY` (queue group
`subjects.LEDGER_QUEUE_GROUP`, so any one of several ledgers answers).

Every query is keyset-paged: a page carries `after`, the sort key of its last row, which the
next query sends back; `after` None means the answer is complete. The ledger fills a page up
to `PAGE_BYTES` of packed rows, so no message comes near NATS's 1 MiB `max_payload` however
big the export. Rows are plain maps (column -> str, int, float, None; an audit row's `detail`
a map), as the ledger's SQL returns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.codec import WireError, need, pack, unpack

QueryKind = Literal["usage", "report", "audit", "series", "node_usage", "node_totals"]
KINDS: frozenset[str] = frozenset({"usage", "report", "audit", "series", "node_usage", "node_totals"})
PAGE_BYTES = 512 * 1024  # packed rows per page: half of NATS's default max_payload
PAGE_ROWS = 2000  # rows a ledger reads per page before cutting it at PAGE_BYTES


@dataclass(frozen=True, slots=True)
class LedgerQuery:
    # usage: the rows (export); report: totals grouped `by`; audit: the audit log; series: totals
    # per `interval` and `by`; node_usage: one node's by day and model; node_totals: per node of `nodes`
    kind: QueryKind
    org: str | None = None  # None: every org (the operator's key)
    since: float | None = None
    until: float | None = None
    by: str = "model"  # report and series: a key of broker_api.ledger_store.GROUPS
    limit: int = 10_000  # rows in all, over every page
    after: list[Any] | None = None  # the previous page's `after`
    interval: int = 3600  # series: seconds per bucket
    node: str = ""  # node_usage
    nodes: list[str] = field(default_factory=list)  # node_totals

    def encode(self) -> bytes:
        return pack(
            {
                "k": self.kind,
                "o": self.org,
                "s": self.since,
                "u": self.until,
                "b": self.by,
                "l": self.limit,
                "a": self.after,
                "i": self.interval,
                "n": self.node,
                "ns": self.nodes,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> LedgerQuery:
        o = unpack(data)
        kind = need(o, "k")
        if kind not in KINDS:
            raise WireError(f"unknown ledger query {kind!r}")
        try:
            after = o.get("a")
            return cls(
                kind=kind,
                org=_optional(o.get("o"), str),
                since=_optional(o.get("s"), float),
                until=_optional(o.get("u"), float),
                by=str(o.get("b", "model")),
                limit=int(o.get("l", 10_000)),
                after=list(after) if after is not None else None,
                interval=int(o.get("i", 3600)),
                node=str(o.get("n", "")),
                nodes=[str(n) for n in o.get("ns", [])],
            )
        except (TypeError, ValueError) as e:
            raise WireError(f"bad ledger query: {e}") from e


@dataclass(frozen=True, slots=True)
class LedgerPage:
    rows: list[dict[str, Any]] = field(default_factory=list)
    after: list[Any] | None = None  # None: this was the last page
    error: dict[str, Any] | None = None  # a schemas.errors wire error instead of rows

    def encode(self) -> bytes:
        return pack({"r": self.rows, "a": self.after, "e": self.error})

    @classmethod
    def decode(cls, data: bytes) -> LedgerPage:
        o = unpack(data)
        rows, after, error = o.get("r", []), o.get("a"), o.get("e")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise WireError("ledger page rows are not a list of maps")
        if after is not None and not isinstance(after, list):
            raise WireError("ledger page cursor is not a list")
        if error is not None and not isinstance(error, dict):
            raise WireError("ledger page error is not a map")
        return cls(rows=rows, after=after, error=error)


def _optional(value: Any, kind: type) -> Any:
    return None if value is None else kind(value)
