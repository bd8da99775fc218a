"""Operator metrics in Prometheus' text format, at `/metrics`.

Request counters and latency histograms are kept in this process (cheap: a dict update when a
request ends). Queue metrics are read from JetStream when scraped: jobs waiting and running in
each (pool, model) work queue, so every gateway reports the same shared queues.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

import nats.errors
from nats.js import JetStreamContext

from schemas import subjects

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*BUCKETS, float("inf")), self.counts):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{"," if labels else ""}le="{le}"}} {total}')
        out.append(f"{name}_sum{{{labels}}} {self.sum}")
        out.append(f"{name}_count{{{labels}}} {total}")
        return out


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)  # (model, outcome, status)
        self.tokens: dict[tuple[str, str], int] = defaultdict(int)  # (model, prompt|completion)
        self.duration: dict[str, Histogram] = defaultdict(Histogram)
        self.ttft: dict[str, Histogram] = defaultdict(Histogram)
        self.inflight = 0

    def finished(
        self, *, model: str, outcome: str, status: int, prompt: int, completion: int, seconds: float, ttft: float | None
    ) -> None:
        self.requests[(model, outcome, str(status))] += 1
        self.tokens[(model, "prompt")] += prompt
        self.tokens[(model, "completion")] += completion
        self.duration[model].observe(seconds)
        if ttft is not None:
            self.ttft[model].observe(ttft)

    def render(self, queues: list[tuple[str, str, int, int]], lane_placements: int = 0) -> str:
        lines = [
            "# HELP tokenyard_requests_total Chat completion requests that ended, by outcome and status.",
            "# TYPE tokenyard_requests_total counter",
        ]
        lines += [
            f'tokenyard_requests_total{{model="{_label(m)}",outcome="{o}",status="{s}"}} {n}'
            for (m, o, s), n in sorted(self.requests.items())
        ]
        lines += ["# HELP tokenyard_tokens_total Tokens billed, by kind.", "# TYPE tokenyard_tokens_total counter"]
        lines += [
            f'tokenyard_tokens_total{{model="{_label(m)}",kind="{k}"}} {n}' for (m, k), n in sorted(self.tokens.items())
        ]
        for name, hists, text in (
            ("tokenyard_request_duration_seconds", self.duration, "Time from arrival to the end."),
            ("tokenyard_time_to_first_token_seconds", self.ttft, "Time to the first token."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
            for model, h in sorted(hists.items()):
                lines += h.lines(name, f'model="{_label(model)}"')
        lines += [
            "# HELP tokenyard_inflight_requests Requests this gateway is serving now.",
            "# TYPE tokenyard_inflight_requests gauge",
            f"tokenyard_inflight_requests {self.inflight}",
        ]
        lines += [
            "# HELP tokenyard_lane_placements_total Jobs this gateway placed through a scheduler's lane.",
            "# TYPE tokenyard_lane_placements_total counter",
            f"tokenyard_lane_placements_total {lane_placements}",
        ]
        lines += [
            "# HELP tokenyard_queue_waiting_jobs Jobs waiting in a work queue.",
            "# TYPE tokenyard_queue_waiting_jobs gauge",
        ]
        lines += [
            f'tokenyard_queue_waiting_jobs{{pool="{_label(p)}",model="{_label(m)}"}} {w}' for p, m, w, _ in queues
        ]
        lines += [
            "# HELP tokenyard_queue_running_jobs Jobs pulled by a worker and not yet acknowledged.",
            "# TYPE tokenyard_queue_running_jobs gauge",
        ]
        lines += [
            f'tokenyard_queue_running_jobs{{pool="{_label(p)}",model="{_label(m)}"}} {r}' for p, m, _, r in queues
        ]
        return "\n".join(lines) + "\n"


async def queue_depths(js: JetStreamContext) -> list[tuple[str, str, int, int]]:
    """(pool, model, waiting, running) for every work-queue consumer."""
    try:
        consumers = await js.consumers_info(subjects.WORK_STREAM)
    except nats.errors.Error:
        return []
    out = []
    for c in consumers:
        parsed = subjects.parse_work_subject(c.config.filter_subject or "")
        if parsed is not None:
            out.append((parsed[0], parsed[1], int(c.num_pending or 0), int(c.num_ack_pending or 0)))
    return sorted(out)
