"""Usage reports, exports and the audit log over NATS: the ledger role answers
(`LedgerService`), any gateway asks (`LedgerClient`), so a gateway needs no ledger of its own.

The protocol is `schemas.ledger`: request/reply on `subjects.LEDGER_QUERY` in a queue group
(one of several ledgers answers each page), keyset-paged so no message nears NATS's 1 MiB
limit. A page that fails on the ledger's side answers with a wire error (a bad `group_by` is
a 400; a database that is away a 503), never with silence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from broker_api.ledger import MAX_GROUPS, NODE_ROWS, SERIES_ROWS
from broker_api.ledger_store import LedgerStore
from schemas import subjects
from schemas.codec import WireError
from schemas.errors import InvalidRequestError, TokenyardError, UnavailableError, from_wire
from schemas.ledger import PAGE_BYTES, PAGE_ROWS, LedgerPage, LedgerQuery

log = structlog.get_logger(__name__)

QUERY_TIMEOUT = 15.0  # seconds one page may take (a big report on a big database)
RETRY_AFTER = 2.0
TOTALS_PER_QUERY = 2000


def _cursor(query: LedgerQuery, row: dict[str, Any]) -> list[Any]:
    if query.kind == "usage":
        return [row["time"], row["job_id"]]
    if query.kind == "audit":
        return [row["time"], row["id"]]
    if query.kind == "series":
        return [row["t"], row[query.by]]
    if query.kind == "node_usage":
        return [row["day"], row["model"]]
    return [row[query.by]]


async def answer_page(store: LedgerStore, query: LedgerQuery) -> LedgerPage:
    """One page of the answer to `query`, cut at `PAGE_BYTES` of packed rows."""
    want = max(0, min(query.limit, PAGE_ROWS))
    q = query
    if q.kind == "node_totals":  # one row per node asked about: one page
        totals = await store.node_totals(q.nodes)
        return LedgerPage(rows=[{"node": node, **counts} for node, counts in totals.items()])
    if q.kind == "usage":
        rows = await store.usage_page(org=q.org, since=q.since, until=q.until, after=q.after, limit=want)
    elif q.kind == "audit":
        rows = await store.audit_page(org=q.org, since=q.since, until=q.until, after=q.after, limit=want)
    elif q.kind == "series":
        rows = await store.series_page(
            org=q.org, by=q.by, interval=q.interval, since=q.since, until=q.until, after=q.after, limit=want
        )
    elif q.kind == "node_usage":
        rows = await store.node_usage_page(node=q.node, after=q.after, limit=want)
    else:
        rows = await store.report_page(org=q.org, by=q.by, since=q.since, until=q.until, after=q.after, limit=want)
    page: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        size += len(msgpack.packb(row, use_bin_type=True))
        if page and size > PAGE_BYTES:
            return LedgerPage(rows=page, after=_cursor(query, page[-1]))
        page.append(row)
    more = len(rows) == want > 0  # a full page: there may be more (the caller stops at its limit)
    return LedgerPage(rows=page, after=_cursor(query, page[-1]) if more and page else None)


class LedgerService:
    """Answers ledger queries from a store, in the ledgers' queue group."""

    def __init__(self, nc: NATS, store: LedgerStore) -> None:
        self._nc = nc
        self._store = store
        self._sub: Subscription | None = None
        self.answered = 0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(
            subjects.LEDGER_QUERY, queue=subjects.LEDGER_QUEUE_GROUP, cb=self._on_query
        )

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_query(self, msg: Msg) -> None:
        try:
            query = LedgerQuery.decode(msg.data)
        except WireError as e:
            log.warning("ledger.bad_query", error=str(e))
            page = LedgerPage(error=InvalidRequestError(f"Unreadable ledger query: {e}").to_wire())
        else:
            page = await self._page(query)
        try:
            await msg.respond(page.encode())
            self.answered += 1
        except nats.errors.Error as e:
            log.warning("ledger.answer_failed", error=repr(e))

    async def _page(self, query: LedgerQuery) -> LedgerPage:
        try:
            return await answer_page(self._store, query)
        except TokenyardError as e:  # a bad group_by, say: the caller's error
            return LedgerPage(error=e.to_wire())
        except Exception as e:  # top of a handler: the database is away; the gateway answers 503
            log.warning("ledger.query_failed", kind=query.kind, error=repr(e))
            return LedgerPage(
                error=UnavailableError(
                    "The ledger's database is unavailable; try again shortly.", retry_after=RETRY_AFTER
                ).to_wire()
            )


class LedgerClient:
    """A `broker_api.ledger.LedgerReader` that asks the ledger role over NATS, page by page."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc

    async def _collect(self, query: LedgerQuery) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        after: list[Any] | None = None
        while len(rows) < query.limit:
            ask = dataclasses.replace(query, limit=query.limit - len(rows), after=after)
            page = await self._ask(ask)
            rows += page.rows
            after = page.after
            if after is None:
                break
        return rows

    async def _ask(self, query: LedgerQuery) -> LedgerPage:
        try:
            reply = await self._nc.request(subjects.LEDGER_QUERY, query.encode(), timeout=QUERY_TIMEOUT)
        except nats.errors.NoRespondersError as e:
            raise UnavailableError(
                "No ledger is running (start `tokenyard ledger`, or run this gateway with --ledger).",
                retry_after=RETRY_AFTER,
            ) from e
        except nats.errors.TimeoutError as e:
            raise UnavailableError("The ledger did not answer in time.", retry_after=RETRY_AFTER) from e
        try:
            page = LedgerPage.decode(reply.data)
        except WireError as e:
            log.error("ledger.bad_page", error=str(e))
            raise UnavailableError("The ledger's answer could not be read.", retry_after=RETRY_AFTER) from e
        if page.error is not None:
            raise from_wire(page.error)
        return page

    async def usage(
        self, *, org: str | None, since: float | None = None, until: float | None = None, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        return await self._collect(LedgerQuery(kind="usage", org=org, since=since, until=until, limit=limit))

    async def report(
        self, *, org: str | None, by: str, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        return await self._collect(
            LedgerQuery(kind="report", org=org, by=by, since=since, until=until, limit=MAX_GROUPS)
        )

    async def audit(
        self, *, org: str | None, since: float | None = None, until: float | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        return await self._collect(LedgerQuery(kind="audit", org=org, since=since, until=until, limit=limit))

    async def series(
        self, *, org: str | None, by: str, interval: int, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        query = LedgerQuery(
            kind="series", org=org, by=by, interval=interval, since=since, until=until, limit=SERIES_ROWS
        )
        return await self._collect(query)

    async def node_usage(self, node: str) -> list[dict[str, Any]]:
        return await self._collect(LedgerQuery(kind="node_usage", node=node, limit=NODE_ROWS))

    async def node_totals(self, nodes: list[str]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for start in range(0, len(nodes), TOTALS_PER_QUERY):  # a query of node ids stays far below 1 MiB
            page = await self._ask(LedgerQuery(kind="node_totals", nodes=nodes[start : start + TOTALS_PER_QUERY]))
            out.update({row["node"]: {"requests": row["requests"], "tokens": row["tokens"]} for row in page.rows})
        return out
