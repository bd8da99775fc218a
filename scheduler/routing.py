"""Routing: which pool (and, with a `models` fallback list, which model) a job goes to.

Pure functions over a snapshot: the routes that serve each model (from the fleet's adverts,
the health stats and the breakers) and the policy that applies (operator config per key, per
model, or the default), refined by the request's OpenRouter-style `provider` object:

- `only` / `ignore`: pools allowed / excluded;
- `order`: pools tried first, in this order; with `allow_fallbacks: false`, only those;
- `sort`: "price" | "throughput" | "latency" replaces the policy's strategy.

Strategies: `most_free` (most free slots, or the shortest predicted wait when none is
free; the default), `cheapest` (advertised prices),
`fastest` (moving averages of TTFT and tokens/s; unmeasured pools are tried first, so they
get measured), `own_first` (own capacity while its predicted wait stays under `spill_wait`
seconds, then the other kinds, cheapest first), `weighted` (a random split by weight, e.g.
A/B), `failover` (the configured order, first usable wins).

Never eligible: volunteer pools for a tenant that did not allow them, routes with no live,
healthy node whose breaker lets a job through (`scheduler.health`: health follows the node, so
one node's death leaves its siblings serving). Pools this job already failed on (`avoid`) are
used only when nothing else is left.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.errors import ContinuationUnavailableError, InvalidRequestError, ModelNotFoundError, NoCapacityError
from schemas.routing import Policy

NO_CAPACITY_RETRY_AFTER = 5.0
SORTS = {"price": "cheapest", "throughput": "throughput", "latency": "latency"}
DEFAULT_JOB_SECONDS = 2.0  # a job's duration before any was measured (own_first's wait estimate)


@dataclass(frozen=True, slots=True)
class Member:
    """One live, healthy node of a route and its slots."""

    node: str
    slots_total: int
    slots_free: int


@dataclass(frozen=True, slots=True)
class Route:
    """One pool's offer for one model, as the snapshot sees it now."""

    pool: str
    model: str
    kind: str = "own"  # "volunteer" if any node of the pool is; "cloud" if all are; else "own"
    nodes: int = 1  # live, healthy, not draining
    slots_total: int = 1
    slots_free: int = 1
    input_price: float = 0.0  # USD per 1M tokens
    output_price: float = 0.0
    context_length: int = 0  # the smallest any of its nodes advertises (0: unknown)
    healthy: bool = True  # some node is healthy
    breaker_ok: bool = True  # some node's breaker lets a job through
    members: tuple[Member, ...] = ()  # the nodes counted in `nodes` and the slots
    prefill: bool = False  # every node of it continues a trailing assistant message (`ModelAdvert`)
    queued: int = 0  # jobs waiting in its work queue
    ttft_ms: float = 0.0  # moving averages; 0 = not measured yet
    tokens_per_s: float = 0.0
    duration_s: float = 0.0

    @property
    def price(self) -> float:
        return self.input_price + self.output_price

    @property
    def predicted_wait(self) -> float:
        """Seconds a new job would wait for a slot: the backlog beyond free slots, drained
        by all slots at the measured job duration."""
        backlog = max(0, self.queued - self.slots_free + 1)
        if self.slots_free > self.queued:
            return 0.0
        return backlog * (self.duration_s or DEFAULT_JOB_SECONDS) / max(self.slots_total, 1)


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Operator config: a default policy, per-model and per-key overrides (key wins)."""

    default: Policy = field(default_factory=Policy)
    models: Mapping[str, Policy] = field(default_factory=dict)
    keys: Mapping[str, Policy] = field(default_factory=dict)

    def policy_for(self, model: str, key_id: str) -> Policy:
        return self.keys.get(key_id) or self.models.get(model) or self.default

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingTable:
        return cls(
            default=Policy.from_dict(d.get("default") or {}),
            models={m: Policy.from_dict(p) for m, p in (d.get("models") or {}).items()},
            keys={k: Policy.from_dict(p) for k, p in (d.get("keys") or {}).items()},
        )

    @classmethod
    def load(cls, path: str) -> RoutingTable:
        """A JSON file (empty path: the defaults)."""
        return cls.from_dict(json.loads(Path(path).read_text())) if path else cls()

    def overlaid(self, entries: Mapping[tuple[str, str], Policy]) -> RoutingTable:
        """This table with the admin API's entries ((scope, id) -> policy) on top: each entry
        replaces the file's policy of the same default, model or key."""
        default = entries.get(("default", ""), self.default)
        models = {**self.models, **{i: p for (scope, i), p in entries.items() if scope == "model"}}
        keys = {**self.keys, **{i: p for (scope, i), p in entries.items() if scope == "key"}}
        return RoutingTable(default=default, models=models, keys=keys)


@dataclass(frozen=True, slots=True)
class ProviderPrefs:
    """The request's `provider` object (OpenRouter's shape); provider names are pool names."""

    order: tuple[str, ...] = ()
    allow_fallbacks: bool = True
    only: frozenset[str] | None = None
    ignore: frozenset[str] = frozenset()
    sort: str = ""

    @classmethod
    def from_request(cls, request: Mapping[str, Any]) -> ProviderPrefs:
        p = request.get("provider")
        if p is None:
            return cls()
        if not isinstance(p, Mapping):
            raise InvalidRequestError("`provider` must be an object.", param="provider")
        sort = str(p.get("sort") or "")
        if sort and sort not in SORTS:
            raise InvalidRequestError(f"`provider.sort` must be one of {', '.join(SORTS)}.", param="provider.sort")
        only = p.get("only")
        return cls(
            order=tuple(_names(p.get("order"), "order")),
            allow_fallbacks=bool(p.get("allow_fallbacks", True)),
            only=frozenset(_names(only, "only")) if only is not None else None,
            ignore=frozenset(_names(p.get("ignore"), "ignore")),
            sort=sort,
        )


def _names(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequestError(f"`provider.{what}` must be a list of provider names.", param=f"provider.{what}")
    return [v.lower() for v in value]


def eligible(
    routes: Iterable[Route], prefs: ProviderPrefs, *, volunteer_ok: bool, continuation: bool = False
) -> list[Route]:
    out = []
    for r in routes:
        if not r.healthy or not r.breaker_ok or r.nodes <= 0:
            continue
        if continuation and not r.prefill:  # it would start a new answer after the text, not go on with it
            continue
        if r.kind == "volunteer" and not volunteer_ok:
            continue
        if (prefs.only is not None and r.pool not in prefs.only) or r.pool in prefs.ignore:
            continue
        if not prefs.allow_fallbacks and prefs.order and r.pool not in prefs.order:
            continue
        out.append(r)
    return out


def _free_first(r: Route) -> tuple[float, ...]:
    return (-r.slots_free, -r.slots_total)


def _key(strategy: str, policy: Policy) -> Callable[[Route], tuple[Any, ...]]:
    position = {p: i for i, p in enumerate(policy.order)}

    def tie(r: Route) -> tuple[Any, ...]:
        return (position.get(r.pool, len(position)), *_free_first(r), r.pool)

    if strategy == "cheapest":
        return lambda r: (r.price, r.predicted_wait, *tie(r))
    if strategy == "fastest":  # latency first, throughput next; unmeasured (0) first so they get measured
        return lambda r: (r.ttft_ms + 1000 * r.predicted_wait, -r.tokens_per_s, *tie(r))
    if strategy == "throughput":
        return lambda r: (-r.tokens_per_s if r.tokens_per_s else float("-inf"), *tie(r))
    if strategy == "latency":
        return lambda r: (r.ttft_ms, *tie(r))
    if strategy == "failover":
        return lambda r: (position.get(r.pool, len(position)), *_free_first(r), r.pool)
    if strategy == "own_first":

        def own_first(r: Route) -> tuple[Any, ...]:
            # own within the wait target, then the others (cheapest first), then own backed up
            tier = (0 if r.predicted_wait <= policy.spill_wait else 2) if r.kind == "own" else 1
            return (tier, r.price if tier == 1 else 0.0, r.predicted_wait, *tie(r))

        return own_first
    return lambda r: (r.predicted_wait, *_free_first(r), *tie(r))  # most_free: shortest backlog when all are busy


def _weighted(routes: list[Route], policy: Policy, draw: float) -> list[Route]:
    """The route picked by `draw` (uniform in [0, 1)) in proportion to weight first, then the
    others by weight. Unweighted pools get no share while a weighted one is usable."""
    weights = dict(policy.weights)
    shares = [(r, max(0.0, weights.get(r.pool, 0.0))) for r in routes]
    total = sum(w for _, w in shares)
    if total <= 0:
        return sorted(routes, key=_key("most_free", policy))
    target, acc, pick = draw * total, 0.0, shares[-1][0]
    for r, w in shares:
        acc += w
        if w > 0 and target < acc:
            pick = r
            break
    rest = sorted((r for r in routes if r is not pick), key=lambda r: (-weights.get(r.pool, 0.0), r.pool))
    return [pick, *rest]


def rank(
    routes: Iterable[Route],
    policy: Policy,
    prefs: ProviderPrefs = ProviderPrefs(),
    *,
    avoid: Collection[str] = (),
    volunteer_ok: bool = False,
    draw: float = 0.0,
    continuation: bool = False,
) -> list[Route]:
    """Every usable route, best first. Empty: nothing may serve this job now."""
    usable = sorted(eligible(routes, prefs, volunteer_ok=volunteer_ok, continuation=continuation), key=lambda r: r.pool)
    strategy = SORTS[prefs.sort] if prefs.sort else policy.strategy
    if strategy == "weighted":
        ranked = _weighted(usable, policy, draw)
    else:
        ranked = sorted(usable, key=_key(strategy, policy))
    if prefs.order:
        position = {p: i for i, p in enumerate(prefs.order)}
        ranked = sorted(ranked, key=lambda r: position.get(r.pool, len(position)))  # stable: rest keep their rank
    if avoid:
        ranked = [r for r in ranked if r.pool not in avoid] + [r for r in ranked if r.pool in avoid]
    return ranked


@dataclass(frozen=True, slots=True)
class Choice:
    model: str
    route: Route
    live_nodes: int  # nodes serving the chosen model in any pool


def candidate_models(model: str, request: Mapping[str, Any]) -> list[str]:
    """The requested model, then the request's `models` fallback list, without repeats."""
    extra = request.get("models") or []
    if not isinstance(extra, list) or not all(isinstance(m, str) for m in extra):
        raise InvalidRequestError("`models` must be a list of model ids.", param="models")
    out = [model]
    for m in extra:
        if m not in out:
            out.append(m)
    return out[:16]


def choose(
    models: list[str],
    routes_of: Callable[[str], list[Route]],
    known: Callable[[str], bool],
    policy_of: Callable[[str], Policy],
    prefs: ProviderPrefs,
    *,
    avoid: Collection[str] = (),
    volunteer_ok: bool = False,
    draw: float = 0.0,
    continuation: bool = False,
) -> Choice:
    """The first model of `models` with a usable route, on its best route; else the error
    the client should see: 404 when no model is known at all, 503 when they are but nothing
    can take the job now (for a continuation: `continuation_unavailable` when no usable route
    accepts the delivered text as an assistant prefix)."""
    for model in models:
        routes = routes_of(model)
        ranked = rank(
            routes,
            policy_of(model),
            prefs,
            avoid=avoid,
            volunteer_ok=volunteer_ok,
            draw=draw,
            continuation=continuation,
        )
        if ranked:
            return Choice(model, ranked[0], sum(r.nodes for r in routes))
    if not any(known(m) for m in models):
        raise ModelNotFoundError(
            f"The model `{models[0]}` does not exist or you do not have access to it.", param="model"
        )
    if continuation:
        raise ContinuationUnavailableError(
            f"No route can continue an answer of `{models[0]}` from the text already delivered.",
            retry_after=NO_CAPACITY_RETRY_AFTER,
        )
    raise NoCapacityError(
        f"No worker can serve `{models[0]}` right now"
        f"{' (with the provider preferences given)' if prefs != ProviderPrefs() else ''}. "
        "Try again shortly.",
        retry_after=NO_CAPACITY_RETRY_AFTER,
    )
