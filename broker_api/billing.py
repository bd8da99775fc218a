"""What a request is charged, as pure functions: the tokens and cost of its usage record (and
of the `usage` its client is shown), and the record itself.

- A finished run: the prompt as the worker counted it (less what a continuation carried into
  it: that text was billed as completion already) and the completion tokens the gateway
  relayed, taken from the worker's count when the relayed text can hold that many.
- A request whose client left: the stopped worker's own final count when it came (a DONE whose
  finish is `cancelled`), else the gateway's estimate of the prompt and what it relayed.
- A stream whose client stopped reading (cut after `--stream-stall-timeout`): what was written
  to the client, never the worker's count of what it produced meanwhile (`counted_by:
  "estimate"`).
- A job whose gateway died: not here; its worker's report (`broker_api.orphans`).
- A cache hit or a replay: the stored answer's numbers, at the configured fraction of its cost.

Nothing here does I/O or knows an API's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from broker_api.output import Output
from broker_api.session import Session
from schemas.answers import CachedAnswer
from schemas.events import Done
from schemas.jobs import Submission
from schemas.registry import Price
from schemas.usage import UsageRecord

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Charge:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cost: float = 0.0  # USD


def completion_tokens(output: Output, done: Done) -> int:
    """As the worker reported when the relayed text can hold that many, else as relayed."""
    reported = done.completion_tokens + output.carried
    if not 0 <= reported <= max(output.tokens, output.chars):
        log.warning("job.usage_mismatch", job_id=done.job_id, reported=reported, relayed=output.tokens)
        return output.tokens
    return reported


def charge(
    output: Output,
    done: Done | None,
    cached: CachedAnswer | None,
    *,
    prompt_estimate: int,
    cache_hit_cost: float,
    price: Price | None = None,
) -> Charge:
    """`price`: the registry's price of the node that ran it, for an enrolled node (its owner's
    price, never the node's own claim); otherwise the cost the worker reported stands."""
    if cached is not None:
        return Charge(
            cached.prompt_tokens,
            cached.completion_tokens,
            cached_tokens=cached.prompt_tokens,
            cost=round(cached.cost * cache_hit_cost, 10),
        )
    if done is not None:
        prompt, completion = max(0, done.prompt_tokens - output.carried), completion_tokens(output, done)
        reported = done.cost or 0.0
    else:  # no count from any worker: nothing relayed means nothing ran for the client
        prompt, completion, reported = (prompt_estimate if output.tokens else 0), output.tokens, 0.0
    cost = price.cost(prompt, completion) if price is not None else reported
    return Charge(prompt, completion, cost=round(cost, 10))


def reserved_tokens(sub: Submission) -> int:
    """What admission reserved: only limited keys reserve, and only those need settling."""
    if sub.key_limits.empty and sub.org_limits.empty:
        return 0
    return max(1, sub.estimated_tokens)


def stored_answer(output: Output, done: Done, bill: Charge, *, model: str = "", route: str = "") -> CachedAnswer:
    """A finished run as the cache and idempotency replays keep it (at its full cost): each
    choice's text, tool-call fragments and logprobs (an embedding job's vectors), and the model
    and route that answered."""
    parts = output.parts
    return CachedAnswer(
        [output.text(i) for i in range(output.choices)],
        list(done.finish),
        bill.prompt_tokens,
        bill.completion_tokens,
        done.cost or 0.0,
        tool_calls=[tuple(p.tool_calls) for p in parts] if any(p.tool_calls for p in parts) else [],
        logprobs=[tuple(p.logprobs) for p in parts] if any(p.logprobs for p in parts) else [],
        vectors=[p.embedding for p in parts] if any(p.embedding for p in parts) else [],
        model=model,
        route=route,
    )


def answering_attempt(s: Session) -> int:
    """The attempt whose output the answer holds (else the current one): what served it."""
    return s.output.attempt if s.output.attempt >= 0 else (s.run.current or 0)


def served_by(s: Session) -> tuple[str, str]:
    """(model, route) that answered: with a `models` fallback list the model placed, not the
    first asked for; a cached answer's own (its route for the client, "cache" in the ledger)."""
    if s.cached is not None:
        return s.cached.model or s.ask.model, s.cached.route
    attempt = answering_attempt(s)
    return s.run.model_of(attempt) or s.ask.model, s.run.route_of(attempt)


def usage_record(s: Session, bill: Charge, *, node: str, now: float) -> UsageRecord:
    """The session's usage record; `node`: the node that ran it as its proof shows
    (`broker_api.attribution`); `now` (monotonic) ends its duration if the response has not."""
    model, route = served_by(s)
    if s.cached is not None:
        route, node, attempts = "cache", "", s.job.dispatch
    else:
        attempts = s.run.job.dispatch
    return UsageRecord(
        job_id=s.job.id,
        time=s.arrived,
        org=s.who.org,
        project=s.who.project,
        key_id=s.who.key_id,
        model=model,
        route=route,
        node=node,
        attempts=attempts,
        prompt_tokens=bill.prompt_tokens,
        completion_tokens=bill.completion_tokens,
        cached_tokens=bill.cached_tokens,
        cost=bill.cost,
        ttft_ms=round((s.first_token - s.started) * 1e3, 3) if s.first_token else 0.0,
        duration_ms=round(((s.ended or now) - s.started) * 1e3, 3),
        outcome=s.outcome,
        status=s.status,
        stream=s.ask.stream,
        reserved_tokens=reserved_tokens(s.sub),
        # a worker's final count, checked against what was relayed, or a stored answer's: the
        # gateway counted; without either, the prompt is the gateway's own estimate
        counted_by="gateway" if s.done is not None or s.cached is not None else "estimate",
    )
