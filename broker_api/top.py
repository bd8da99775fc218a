"""`tokenyard top`: a live terminal view of the stack, refreshed every second.

It reads what the metrics expose, so it shows what Prometheus would: the gateway's `/metrics`
(requests by outcome, errors, TTFT, tokens, in flight, work queues, ledger lag) and the
schedulers' and workers' probe ports (nodes, slots, the fair-share backlog by tier, circuit
breakers, each worker's jobs). Rates are the difference of two scrapes.

Where: `--api-url` (else the local `tokenyard up`'s, as the admin commands find it) and
`--scrape URL` for each scheduler or worker metrics endpoint (else the ones `tokenyard up`
wrote to `<data dir>/metrics_urls`). `--once` prints one frame (two scrapes `--interval`
apart) and exits, for scripts and tests.

Rendered with rich (a live-updating table needs no input handling, which is all textual would
add; rich is already in most environments and renders the same frame to a string for `--once`).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from broker_api.admin_cli import api_url
from schemas.settings import add_setting

Labels = frozenset[tuple[str, str]]


@dataclass(slots=True)
class Scrape:
    """Every sample of the scraped endpoints, and which could not be read."""

    at: float
    values: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=lambda: defaultdict(list))
    down: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.values[s.name].append((s.labels, s.value))

    def sum(self, name: str, **labels: str) -> float:
        return sum(v for ls, v in self.values.get(name, ()) if all(ls.get(k) == w for k, w in labels.items()))

    def by(self, name: str, *keys: str, **labels: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for ls, v in self.values.get(name, ()):
            if all(ls.get(k) == w for k, w in labels.items()):
                out[tuple(ls.get(k, "") for k in keys)] += v
        return dict(out)

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram summed over its labels."""
        merged = self.by(f"{name}_bucket", "le")
        return sorted((float(le), n) for (le,), n in merged.items())


def scrape(urls: list[str], client: httpx.Client) -> Scrape:
    out = Scrape(time.monotonic())
    for url in urls:
        try:
            r = client.get(url)
            r.raise_for_status()
            out.add(r.text)
        except (httpx.HTTPError, ValueError):
            out.down.append(url)
    return out


def quantile(q: float, now: list[tuple[float, float]], before: list[tuple[float, float]]) -> float | None:
    """The q-quantile of what a histogram observed between two scrapes (all of it, if no
    earlier scrape), interpolated within its bucket as Prometheus' histogram_quantile does."""
    prior = dict(before)
    counts = [(le, n - prior.get(le, 0.0)) for le, n in now]
    if not counts or counts[-1][1] <= 0:
        return None
    rank, lower, seen = q * counts[-1][1], 0.0, 0.0
    for le, n in counts:
        if n >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * ((rank - seen) / (n - seen) if n > seen else 1.0)
        lower, seen = le, n
    return None


def _rate(now: Scrape, before: Scrape | None, name: str, **labels: str) -> float:
    if before is None:
        return 0.0
    return max(0.0, now.sum(name, **labels) - before.sum(name, **labels)) / max(now.at - before.at, 1e-3)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def frame(now: Scrape, before: Scrape | None, *, api: str) -> Group:
    """One screen: the summary line, then queues, nodes and breakers."""
    outcomes = ("ok", "cached", "replayed", "cancelled", "refused", "invalid", "error")
    rates = {o: _rate(now, before, "tokenyard_api_requests_total", outcome=o) for o in outcomes}
    total = sum(rates.values())
    b = before.buckets("tokenyard_api_time_to_first_token_seconds") if before else []
    ttft = now.buckets("tokenyard_api_time_to_first_token_seconds")
    summary = Table.grid(padding=(0, 2))
    summary.add_row(
        Text(f"tokenyard top  {api}", style="bold"),
        f"{time.strftime('%H:%M:%S')}",
        f"in flight {now.sum('tokenyard_api_inflight_requests'):.0f}",
        f"models {max((v for _, v in now.values.get('tokenyard_scheduler_models', ())), default=0):.0f}",
    )
    summary.add_row(
        f"requests {total:.1f}/s",
        "  ".join(f"{o} {rates[o]:.1f}" for o in outcomes if rates[o] or o == "ok"),
        f"errors {100 * rates['error'] / total if total else 0:.1f}%"
        f"  refused {100 * rates['refused'] / total if total else 0:.1f}%",
        f"tokens {_rate(now, before, 'tokenyard_api_tokens_total', kind='completion'):.0f}/s",
    )
    summary.add_row(
        f"TTFT p50 {_ms(quantile(0.5, ttft, b))}",
        f"p95 {_ms(quantile(0.95, ttft, b))}",
        f"ledger lag {now.sum('tokenyard_api_ledger_lag_records'):.0f}",
        f"failovers {now.sum('tokenyard_api_failovers_total'):.0f}",
    )
    parts: list[Table | Text] = [summary, _queues(now), _nodes(now), _breakers(now)]
    if now.down:
        parts.append(Text("unreachable: " + ", ".join(now.down), style="yellow"))
    return Group(*parts)


def _queues(now: Scrape) -> Table:
    t = Table(title="queues (held: interactive/standard/batch)", title_justify="left")
    t.add_column("pool")
    t.add_column("model", overflow="fold")
    for col in ("waiting", "running", "held"):
        t.add_column(col, justify="right")
    work = now.by("tokenyard_api_work_queue_jobs", "pool", "model", "state") or now.by(
        "tokenyard_scheduler_work_queue_jobs", "pool", "model", "state"
    )
    held = now.by("tokenyard_scheduler_held_jobs", "pool", "model", "priority")
    pairs = sorted({k[:2] for k in work} | {k[:2] for k in held})
    for pool, model in pairs:
        tiers = "/".join(f"{held.get((pool, model, p), 0):.0f}" for p in ("interactive", "standard", "batch"))
        t.add_row(pool, model, *(f"{work.get((pool, model, s), 0):.0f}" for s in ("waiting", "running")), tiers)
    return t


def _nodes(now: Scrape) -> Table:
    t = Table(title="nodes and slots", title_justify="left")
    for col in ("pool", "kind", "slots used", "slots free"):
        t.add_column(col, justify="left" if col in ("pool", "kind") else "right")
    slots = now.by("tokenyard_scheduler_slots", "pool", "kind", "state")
    for pool, kind in sorted({k[:2] for k in slots}):
        t.add_row(pool, kind, f"{slots.get((pool, kind, 'used'), 0):.0f}", f"{slots.get((pool, kind, 'free'), 0):.0f}")
    nodes = now.by("tokenyard_scheduler_nodes", "state")
    t.caption = "nodes: " + ", ".join(f"{state} {n:.0f}" for (state,), n in sorted(nodes.items())) if nodes else ""
    return t


def _breakers(now: Scrape) -> Text:
    states = now.by("tokenyard_scheduler_breaker_state", "pool", "state")
    bad = sorted(f"{pool} ({state})" for (pool, state), v in states.items() if v and state != "closed")
    if not states and "tokenyard_scheduler_breaker_state" not in now.values:
        return Text("breakers: (no scheduler scraped: pass --scrape)", style="dim")
    return Text("open breakers: " + (", ".join(bad) if bad else "none"), style="red" if bad else "green")


def _scrape_urls(given: list[str], data_dir: str) -> list[str]:
    if given:
        return given
    try:
        lines = (Path(data_dir).expanduser() / "metrics_urls").read_text().split()
    except OSError:
        return []
    return [line for line in lines if line.startswith("http")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenyard top", description="A live view of a Tokenyard stack.")
    add_setting(p, "--api-url", default="", help="the gateway (default: the local `tokenyard up`'s)")
    add_setting(p, "--data-dir", default=os.path.expanduser("~/.tokenyard"), help="the data dir of `tokenyard up`")
    p.add_argument("--admin-key", default="", help=argparse.SUPPRESS)  # a global flag of the CLI; unused here
    p.add_argument("--scrape", action="append", default=[], help="a scheduler's or worker's /metrics URL")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    return p


def main(argv: list[str]) -> int:
    a = parser().parse_args(argv)
    api = api_url(a.api_url, a.data_dir)
    urls = [f"{api}/metrics", *_scrape_urls(a.scrape, a.data_dir)]
    console = Console()
    with httpx.Client(timeout=max(0.5, a.interval)) as client:
        before = scrape(urls, client)
        if f"{api}/metrics" in before.down:
            console.print(f"tokenyard top: cannot read {api}/metrics (is the gateway running? --api-url says where)")
            return 1
        if a.once:
            time.sleep(a.interval)
            console.print(frame(scrape(urls, client), before, api=api))
            return 0
        with Live(frame(before, None, api=api), console=console, screen=False, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(a.interval)
                    now = scrape(urls, client)
                    live.update(frame(now, before, api=api), refresh=True)
                    before = now
            except KeyboardInterrupt:
                return 0
