"""The numbers `peers.py` reports: one run's metrics from its samples, the summary over repeated
runs (median and range), and the tables printed (Markdown, ready for bench/RESULTS.md)."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench.loadgen import Cell
from bench.procs import pct

# (key, heading, format) of the main table; each shows the median, and the range over the runs.
COLUMNS = (
    ("rps", "req/s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("added_p50_ms", "added p50 ms", "{:.2f}"),
    ("added_p99_ms", "added p99 ms", "{:.2f}"),
    ("ttft_p50_ms", "TTFT p50 ms", "{:.2f}"),
    ("added_ttft_p50_ms", "added TTFT p50 ms", "{:.2f}"),
    ("gap_p50_ms", "gap p50 / p99 ms", "{:.2f}"),
    ("cpu_ms_per_req", "CPU ms/req", "{:.2f}"),
    ("error_count", "errors", "{:.0f}"),
    ("hung", "of which hung", "{:.0f}"),
)


def cell_metrics(cell: Cell) -> dict[str, Any]:
    ok = cell.ok
    lat = [s.latency * 1e3 for s in (ok or cell.samples)]
    ttft = [s.ttft * 1e3 for s in ok if s.ttft is not None]
    gaps = [g * 1e3 for s in ok for g in s.gaps]
    return {
        "requests": len(cell.samples),
        "ok": len(ok),
        "errors": cell.errors(),
        "error_count": len(cell.samples) - len(ok),
        "hung": sum(1 for x in cell.samples if x.error == "timeout"),
        "wall_s": cell.wall,
        # good answers per second until the last one: a hung request holds its client until the
        # timeout, and waiting for it must not count as serving time
        "rps": len(ok) / cell.answering_seconds() if ok else 0.0,
        "rps_wall": len(ok) / cell.wall if cell.wall else 0.0,
        "p50_ms": pct(lat, 0.5),
        "p99_ms": pct(lat, 0.99),
        "ttft_p50_ms": pct(ttft, 0.5),
        "ttft_p99_ms": pct(ttft, 0.99),
        "gap_p50_ms": pct(gaps, 0.5),
        "gap_p99_ms": pct(gaps, 0.99),
        "content_chunks_per_stream": len(gaps) / len(ttft) + 1 if ttft else 0.0,
    }


def one_line(r: dict[str, Any]) -> str:
    s = f"{r['rps']:.0f}/s p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms, CPU {r['cpu_ms_per_req']:.2f} ms/req"
    if r["ttft_p50_ms"] == r["ttft_p50_ms"]:
        s += f", TTFT {r['ttft_p50_ms']:.2f} ms"
    if r["error_count"]:
        s += f", errors {r['errors']}"
    return s + f", load {r['load']:.2f}, client CPU {100 * r['client_cpu_share']:.0f}%"


def _spread(values: list[float]) -> dict[str, float]:
    clean = [v for v in values if v == v]
    if not clean:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean)}


def summarize_runs(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per cell and system: each metric's median/min/max over the runs; `added_*` against the
    upstream's run of the same repetition."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for cell, systems in runs.items():
        base = systems.get("upstream")
        for name, rs in systems.items():
            keys = [k for k, v in rs[0].items() if isinstance(v, (int, float))]
            s: dict[str, Any] = {k: _spread([r[k] for r in rs]) for k in keys}
            if base and name != "upstream":
                for k in ("p50_ms", "p99_ms", "ttft_p50_ms"):
                    s[f"added_{k}"] = _spread([r[k] - b[k] for r, b in zip(rs, base)])
            roles = rs[0]["cpu_ms_per_req_by_process"]
            s["cpu_by_process"] = {role: _spread([r["cpu_ms_per_req_by_process"][role] for r in rs]) for role in roles}
            s["rss_mb_max"] = {role: max(r["rss_mb"][role] for r in rs) for role in rs[0]["rss_mb"]}
            s["errors"] = [r["errors"] for r in rs if r["errors"]]
            if "nats_msgs_per_req" in rs[0]:
                s["nats_msgs_per_req"] = {
                    role: [statistics.median(r["nats_msgs_per_req"].get(role, [0, 0])[i] for r in rs) for i in (0, 1)]
                    for role in rs[0]["nats_msgs_per_req"]
                }
            out.setdefault(cell, {})[name] = s
    return out


def _fmt(s: dict[str, float] | None, form: str) -> str:
    if not s or s["median"] != s["median"]:
        return "-"
    text = form.format(s["median"])
    lo, hi = form.format(s["min"]), form.format(s["max"])
    return text if lo == hi else f"{text} ({lo}-{hi})"


def _main_table(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    lines = ["| cell | system | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for cell, systems in summary.items():
        for name, s in systems.items():
            row = []
            for key, _, form in COLUMNS:
                text = _fmt(s.get(key), form)
                if key == "gap_p50_ms" and text != "-":
                    text += " / " + _fmt(s.get("gap_p99_ms"), form)
                row.append(text)
            lines.append(f"| {cell} | {name} | " + " | ".join(row) + " |")
    return lines


def _issue_table(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The issue's shape: one row per cell, one column per system (medians)."""
    names = list(dict.fromkeys(n for systems in summary.values() for n in systems))
    lines = ["| cell | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for cell, systems in summary.items():
        row = []
        for name in names:
            s = systems.get(name)
            if s is None:
                row.append("-")
                continue
            m = {k: v["median"] for k, v in s.items() if isinstance(v, dict) and "median" in v}
            parts = [f"{m['rps']:,.0f}/s", f"p50 {m['p50_ms']:.2f} / p99 {m['p99_ms']:.2f} ms"]
            if m.get("ttft_p50_ms") == m.get("ttft_p50_ms"):
                parts.append(f"TTFT {m['ttft_p50_ms']:.2f} ms")
            parts.append(f"CPU {m['cpu_ms_per_req']:.2f} ms/req")
            if m["error_count"]:
                parts.append(f"**{m['error_count']:.0f} errors**")
            row.append(", ".join(parts))
        lines.append(f"| {cell} | " + " | ".join(row) + " |")
    return lines


def render(
    summary: dict[str, dict[str, dict[str, Any]]],
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    a: argparse.Namespace,
    load0: tuple[float, float, float],
    info: dict[str, dict[str, Any]],
) -> str:
    loads = [r["load"] for systems in runs.values() for rs in systems.values() for r in rs]
    out = [
        f"# {a.repeat} run(s) per cell, at most {a.requests} requests / {a.seconds:g} s each, {a.tokens}-token answers;"
        f" load average 1 min: {load0[0]:.2f} at start, {min(loads):.2f}-{max(loads):.2f} during the cells;"
        f" JetStream fsync on every write: {a.fsync}",
        "# req/s: good answers per second until the last good one; errors include requests that had not"
        f" ended {a.timeout:g} s after they were sent (hung); CPU: every process of the system, per request",
    ]
    if info:
        out.append("# " + "; ".join(f"{k}: {v}" for k, v in info.items()))
    out += ["", "Median of the runs (range in brackets):", ""] + _main_table(summary)
    out += ["", "In the issue's shape (medians):", ""] + _issue_table(summary)
    out += ["", "CPU ms per request by process (medians):", ""]
    for cell, systems in summary.items():
        for name, s in systems.items():
            split = ", ".join(f"{role} {v['median']:.2f}" for role, v in s["cpu_by_process"].items())
            upstream = s["upstream_cpu_ms_per_req"]["median"]
            client = s["client_cpu_share"]["max"]
            out.append(
                f"- {cell} / {name}: {split} (upstream {upstream:.2f}; load client at most {100 * client:.0f}% CPU)"
            )
    out += ["", "RSS MB per process (largest seen in any run):", ""]
    rss: dict[str, dict[str, float]] = {}
    for systems in summary.values():
        for name, s in systems.items():
            for role, v in s["rss_mb_max"].items():
                rss.setdefault(name, {})[role] = max(rss.get(name, {}).get(role, 0.0), v)
    for name, roles in rss.items():
        out.append(f"- {name}: " + ", ".join(f"{role} {v:.0f}" for role, v in roles.items()))
    msgs = [
        (c, n, s["nats_msgs_per_req"])
        for c, systems in summary.items()
        for n, s in systems.items()
        if "nats_msgs_per_req" in s
    ]
    if msgs:
        out += ["", "NATS messages per request, sent / received by each role's connections (medians):", ""]
        for cell, name, m in msgs:
            out.append(f"- {cell} / {name}: " + ", ".join(f"{role} {v[0]:g} / {v[1]:g}" for role, v in m.items()))
    errors = [(c, n, s["errors"]) for c, systems in summary.items() for n, s in systems.items() if s["errors"]]
    if errors:
        out += ["", "Errors by kind, per run that had any:", ""]
        out += [f"- {cell} / {name}: {e}" for cell, name, e in errors]
    return "\n".join(out)
