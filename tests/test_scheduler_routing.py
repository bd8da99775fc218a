"""Routing policies, the provider object, the `models` fallback list, circuit breakers, the
avoid list: pure tests over snapshots, then placement end to end over real adverts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from scheduler.health import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerConfig, Health
from scheduler.routing import Policy, ProviderPrefs, Route, RoutingTable, candidate_models, choose, rank
from schemas.errors import InvalidRequestError, ModelNotFoundError, NoCapacityError, from_wire
from schemas.jobs import Submission
from schemas.usage import UsageRecord
from tests.helpers import FakeNodes, eventually, node, publish_usage, submit
from tests.helpers import job as _job
from tests.stack import Stack

M = "m/one"


def r(pool: str, **kw: Any) -> Route:
    return Route(pool=pool, model=kw.pop("model", M), **kw)


def job(job_id: str, *, model: str = M, **kw: Any) -> Any:
    return _job(job_id, model=model, **kw)


def pools(routes: list[Route]) -> list[str]:
    return [x.pool for x in routes]


# --- pure: strategies -----------------------------------------------------------------------


def test_most_free_is_the_default() -> None:
    routes = [
        r("a", slots_free=1, slots_total=8),
        r("b", slots_free=5, slots_total=8),
        r("c", slots_free=5, slots_total=9),
    ]
    assert pools(rank(routes, Policy())) == ["c", "b", "a"]


def test_cheapest_by_advertised_prices() -> None:
    routes = [
        r("cloud-x", kind="cloud", input_price=3, output_price=15),
        r("own", input_price=0, output_price=0),
        r("cloud-y", kind="cloud", input_price=0.5, output_price=1.5),
    ]
    assert pools(rank(routes, Policy("cheapest"))) == ["own", "cloud-y", "cloud-x"]


def test_fastest_by_measured_latency_then_throughput_and_unmeasured_first() -> None:
    routes = [
        r("slow", ttft_ms=900, tokens_per_s=20),
        r("quick", ttft_ms=100, tokens_per_s=30),
        r("quick2", ttft_ms=100, tokens_per_s=80),
        r("new"),
    ]
    assert pools(rank(routes, Policy("fastest"))) == ["new", "quick2", "quick", "slow"]


def test_own_first_spills_over_when_the_predicted_wait_is_too_long() -> None:
    own = r("own", slots_total=4, slots_free=0, queued=2, duration_s=1.0)  # (2-0+1) * 1 s / 4 = 0.75 s
    cloud = [r("c-dear", kind="cloud", input_price=5), r("c-cheap", kind="cloud", input_price=1)]
    assert pools(rank([own, *cloud], Policy("own_first", spill_wait=2.0))) == ["own", "c-cheap", "c-dear"]
    busy = r("own", slots_total=4, slots_free=0, queued=20, duration_s=1.0)  # 5.25 s
    assert pools(rank([busy, *cloud], Policy("own_first", spill_wait=2.0))) == ["c-cheap", "c-dear", "own"]


def test_weighted_split_follows_the_draw() -> None:
    policy = Policy("weighted", weights=(("a", 0.9), ("b", 0.1)))
    routes = [r("a"), r("b"), r("c")]
    assert pools(rank(routes, policy, draw=0.0)) == ["a", "b", "c"]
    assert pools(rank(routes, policy, draw=0.89)) == ["a", "b", "c"]
    assert pools(rank(routes, policy, draw=0.95)) == ["b", "a", "c"]
    picks = [rank(routes, policy, draw=i / 1000)[0].pool for i in range(1000)]
    assert picks.count("a") == 900 and picks.count("b") == 100
    assert pools(rank([r("c"), r("d", slots_free=3)], policy)) == ["d", "c"]  # none weighted: most free


def test_failover_takes_the_first_usable_in_order() -> None:
    policy = Policy("failover", order=("primary", "secondary", "last"))
    routes = [r("last"), r("secondary"), r("primary", healthy=False), r("other", slots_free=99)]
    assert pools(rank(routes, policy)) == ["secondary", "last", "other"]


# --- pure: eligibility, provider object, avoid ----------------------------------------------


def test_unhealthy_open_and_volunteer_pools_are_not_eligible() -> None:
    routes = [r("sick", healthy=False), r("tripped", breaker_ok=False), r("vol", kind="volunteer"), r("ok")]
    assert pools(rank(routes, Policy())) == ["ok"]
    assert pools(rank(routes, Policy(), volunteer_ok=True)) == ["ok", "vol"]


def test_avoided_pools_go_last_and_only_serve_when_nothing_else_can() -> None:
    routes = [r("a", slots_free=9), r("b", slots_free=1)]
    assert pools(rank(routes, Policy(), avoid=["a"])) == ["b", "a"]
    assert pools(rank([r("a")], Policy(), avoid=["a"])) == ["a"]


def test_provider_only_ignore_order_and_fallbacks() -> None:
    routes = [r("a", slots_free=1), r("b", slots_free=2), r("c", slots_free=3)]
    assert pools(rank(routes, Policy(), ProviderPrefs(only=frozenset({"a", "b"})))) == ["b", "a"]
    assert pools(rank(routes, Policy(), ProviderPrefs(ignore=frozenset({"c"})))) == ["b", "a"]
    assert pools(rank(routes, Policy(), ProviderPrefs(order=("a",)))) == ["a", "c", "b"]
    assert pools(rank(routes, Policy(), ProviderPrefs(order=("a", "b"), allow_fallbacks=False))) == ["a", "b"]


def test_provider_sort_replaces_the_policy() -> None:
    routes = [
        r("a", input_price=3, ttft_ms=50, tokens_per_s=10),
        r("b", input_price=1, ttft_ms=500, tokens_per_s=90),
        r("c", input_price=2, ttft_ms=200, tokens_per_s=50),
    ]
    assert pools(rank(routes, Policy("failover", order=("c",)), ProviderPrefs(sort="price"))) == ["b", "c", "a"]
    assert pools(rank(routes, Policy(), ProviderPrefs(sort="throughput"))) == ["b", "c", "a"]
    assert pools(rank(routes, Policy(), ProviderPrefs(sort="latency"))) == ["a", "c", "b"]


def test_provider_object_is_read_strictly() -> None:
    prefs = ProviderPrefs.from_request(
        {
            "provider": {
                "order": ["Own", "cloud-a"],
                "allow_fallbacks": False,
                "only": ["own"],
                "ignore": ["x"],
                "sort": "price",
            }
        }
    )
    assert prefs == ProviderPrefs(
        order=("own", "cloud-a"), allow_fallbacks=False, only=frozenset({"own"}), ignore=frozenset({"x"}), sort="price"
    )
    assert ProviderPrefs.from_request({}) == ProviderPrefs()
    for bad in ({"sort": "vibes"}, {"order": "own"}, "own"):
        with pytest.raises(InvalidRequestError):
            ProviderPrefs.from_request({"provider": bad})


def test_routing_table_key_beats_model_beats_default(tmp_path: Path) -> None:
    path = tmp_path / "routing.json"
    path.write_text(
        json.dumps(
            {
                "default": {"strategy": "cheapest"},
                "models": {M: {"strategy": "fastest"}},
                "keys": {"k1": {"strategy": "failover", "order": ["b"]}},
            }
        )
    )
    table = RoutingTable.load(str(path))
    assert table.policy_for("other", "k0").strategy == "cheapest"
    assert table.policy_for(M, "k0").strategy == "fastest"
    assert table.policy_for(M, "k1") == Policy("failover", order=("b",))
    with pytest.raises(ValueError):
        RoutingTable.from_dict({"default": {"strategy": "random"}})


# --- pure: models fallback and errors ----------------------------------------------------------


def test_models_fallback_takes_the_first_model_with_a_usable_route() -> None:
    routes = {"a": [r("p", model="a", healthy=False)], "b": [r("q", model="b")]}
    models = candidate_models("a", {"models": ["a", "b", "c"]})
    assert models == ["a", "b", "c"]
    choice = choose(models, lambda m: routes.get(m, []), lambda m: m in routes, lambda m: Policy(), ProviderPrefs())
    assert (choice.model, choice.route.pool) == ("b", "q")


def test_unknown_models_are_404_and_known_without_capacity_503() -> None:
    with pytest.raises(ModelNotFoundError):
        choose(["x", "y"], lambda m: [], lambda m: False, lambda m: Policy(), ProviderPrefs())
    with pytest.raises(NoCapacityError) as e:
        choose(
            ["x", "y"],
            lambda m: [r("p", model=m, breaker_ok=False)],
            lambda m: m == "y",
            lambda m: Policy(),
            ProviderPrefs(),
        )
    assert e.value.retry_after
    with pytest.raises(InvalidRequestError):
        candidate_models("a", {"models": "b"})


# --- pure: breaker --------------------------------------------------------------------------


def test_breaker_opens_after_n_failures_probes_after_cooldown_and_closes_on_success() -> None:
    b = Breaker(BreakerConfig(failures=3, cooldown=10.0, probe_timeout=5.0))
    for i in range(2):
        b.record(False, 100.0 + i)
    assert b.state == CLOSED and b.allows(102)
    b.record(False, 102.0)
    assert b.state == OPEN and not b.allows(105.0)
    assert b.allows(112.0)
    b.placed(112.0)  # the probe
    assert b.state == HALF_OPEN and not b.allows(113.0)  # one probe at a time
    assert b.allows(117.5)  # the probe never reported: let another through
    b.record(False, 118.0)
    assert b.state == OPEN and not b.allows(120.0)
    b.placed(128.5)
    b.record(True, 129.0)
    assert b.state == CLOSED and b.allows(129.0)


def test_breaker_opens_on_error_rate_and_a_success_resets_the_streak() -> None:
    b = Breaker(BreakerConfig(failures=100, error_rate=0.5, min_samples=10))
    for i in range(30):
        b.record(i % 4 != 0, float(i))  # 25 % errors: stays closed
    assert b.state == CLOSED
    for i in range(30):
        b.record(i % 4 == 0, 100.0 + i)  # 75 % errors: opens
    assert b.state == OPEN


def test_health_reads_usage_records() -> None:
    from schemas.usage import UsageRecord

    def rec(outcome: str, status: int, route: str = "p") -> UsageRecord:
        return UsageRecord("j", 0, "o", "", "k", M, route, "n", 1, 10, 50, 0, 0.0, 200.0, 1200.0, outcome, status)

    h = Health(BreakerConfig(failures=2))
    h.observe(rec("error", 400), 0)  # the request's fault: not the route's
    h.observe(rec("cancelled", 499), 0)
    h.observe(rec("ok", 200, route="cache"), 0)
    assert h.allows("p", "n", M, 1) and not h.breakers
    h.observe(rec("ok", 200), 0)
    stats = h.stats[("p", M)]
    assert stats.ttft_ms == 200 and stats.tokens_per_s == pytest.approx(50.0) and stats.duration_s == 1.2
    h.observe(rec("error", 502), 1)
    h.observe(rec("error", 503), 2)
    assert not h.allows("p", "n", M, 3)
    assert h.allows("p", "sibling", M, 3) and h.allows("p", "n", "m/other", 3)  # that node, that model only
    assert h.usable("p", M, ["n", "sibling"], 3) == ["sibling"]


def test_health_follows_the_node_and_the_model() -> None:
    h = Health(BreakerConfig(failures=3, cooldown=10.0))
    for t in range(3):
        h.failed("pool", "dead", M, float(t))  # re-dispatches away from a dead node
    assert h.usable("pool", M, ["dead", "alive"], 3.0) == ["alive"]  # its sibling keeps the route
    assert not h.closed("pool", M, ["dead", "alive"]) and h.closed("pool", M, ["alive"])
    for t in range(3):
        h.failed("cloud", "adapter", "m/broken", float(t))  # a provider's model failing
    assert h.usable("cloud", "m/broken", ["adapter"], 3.0) == []
    assert h.usable("cloud", M, ["adapter"], 3.0) == ["adapter"]  # its other models are fine
    h.failed("", "", M, 3.0)  # a re-dispatch that names no attempt: nothing to count
    assert list(h.breakers) == [("pool", "dead", M), ("cloud", "adapter", "m/broken")]
    # after the cooldown one job is the probe; its success closes the node's breaker
    assert h.usable("pool", M, ["dead", "alive"], 13.0) == ["dead", "alive"]
    h.placed("pool", M, ["dead", "alive"], 13.0)
    assert h.usable("pool", M, ["dead", "alive"], 13.5) == ["alive"]  # one probe at a time
    h.observe(UsageRecord("j", 0, "o", "", "k", M, "pool", "dead", 1, 1, 1, 0, 0.0, 1.0, 2.0, "ok", 200), 14.0)
    assert h.closed("pool", M, ["dead", "alive"])


# --- end to end: one scheduler, simulated nodes --------------------------------------------------


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[Stack, FakeNodes, NATS]]:
    routing = tmp_path / "routing.json"
    routing.write_text(
        json.dumps(
            {
                "default": {"strategy": "own_first", "spill_wait": 2.0},
                "models": {"m/cheap": {"strategy": "cheapest"}},
                "keys": {"ab-key": {"strategy": "weighted", "weights": {"own": 1, "cloud-b": 1}}},
            }
        )
    )
    stack = Stack(tmp_path)
    stack.start_nats()
    nc = await stack.connect()
    nodes = await FakeNodes(
        nc,
        [
            node("own-1", "own", model=M, slots=2),
            node("vol-1", "vol", model=M, slots=50, kind="volunteer"),
            node("cloud-a-1", "cloud-a", model=M, slots=100, kind="cloud", price=(1.0, 2.0)),
            node("cloud-b-1", "cloud-b", model=M, slots=100, kind="cloud", price=(0.5, 1.0)),
            node("cheap-1", "cloud-a", model="m/cheap", slots=10, kind="cloud", price=(0.2, 0.2)),
            node("cheap-2", "cloud-b", model="m/cheap", slots=10, kind="cloud", price=(0.1, 0.1)),
            node("sick-1", "sick", model="m/sick", healthy=False),
        ],
    ).start()
    stack.start_scheduler(
        TOKENYARD_ROUTING_FILE=str(routing), TOKENYARD_BREAKER_FAILURES="2", TOKENYARD_BREAKER_COOLDOWN="1.0"
    )
    try:
        await stack.wait_for_scheduler()
        yield stack, nodes, nc
    finally:
        await nodes.stop()
        await nc.close()
        await stack.close()


async def test_placement_over_real_adverts(fleet: Any) -> None:
    _, _, nc = fleet
    first = await submit(nc, Submission(job=job("e2e-0")))
    assert (first.error, first.pool) == (None, "own")  # own capacity first
    cheap = await submit(nc, Submission(job=job("e2e-1", model="m/cheap")))
    assert cheap.pool == "cloud-b"
    vol = await submit(
        nc, Submission(job=job("e2e-2", request={"model": M, "provider": {"only": ["vol"]}}), volunteer_ok=True)
    )
    assert vol.pool == "vol"
    no_vol = await submit(nc, Submission(job=job("e2e-3", request={"model": M, "provider": {"only": ["vol"]}})))
    assert from_wire(no_vol.error or {}).status == 503  # never on volunteers without consent
    ordered = await submit(nc, Submission(job=job("e2e-4", request={"model": M, "provider": {"order": ["cloud-a"]}})))
    assert ordered.pool == "cloud-a"
    fallback = await submit(
        nc, Submission(job=job("e2e-5", model="m/sick", request={"model": "m/sick", "models": ["m/cheap"]}))
    )
    assert (fallback.pool, fallback.model) == ("cloud-b", "m/cheap")
    sick = await submit(nc, Submission(job=job("e2e-6", model="m/sick")))
    assert from_wire(sick.error or {}).status == 503
    missing = await submit(nc, Submission(job=job("e2e-7", model="m/none")))
    assert from_wire(missing.error or {}).status == 404
    split = [await submit(nc, Submission(job=job(f"ab-{i}"), key_id="ab-key")) for i in range(40)]
    assert {a.pool for a in split} == {"own", "cloud-b"}


async def test_own_first_spills_to_the_cheapest_cloud_when_own_is_backed_up(fleet: Any) -> None:
    stack, nodes, nc = fleet
    nodes.set(node("own-1", "own", model=M, slots=2, free=0))
    await nodes.publish()
    await asyncio.sleep(0.1)  # let the fleet view take the advert (it is rebuilt every 50 ms)
    pools_seen = [(await submit(nc, Submission(job=job(f"spill-{i}")))).pool for i in range(12)]
    # nobody pulls from `own`: after a few jobs its predicted wait passes 2 s and the rest spill
    assert pools_seen[0] == "own" and pools_seen[-1] == "cloud-b"


async def test_avoid_and_breaker_steer_away_from_a_failing_pool(fleet: Any) -> None:
    _, _, nc = fleet
    prefs = {"model": M, "provider": {"only": ["cloud-a", "cloud-b"], "sort": "price"}}
    first = await submit(nc, Submission(job=job("brk-0", request=prefs)))
    assert first.pool == "cloud-b"
    failed = {"avoid": ("cloud-b",), "failed_pool": "cloud-b", "failed_node": "cloud-b-1"}
    again = await submit(nc, Submission(job=job("brk-0", request=prefs, dispatch=2), **failed))  # type: ignore[arg-type]
    assert again.pool == "cloud-a"  # the re-dispatch avoids the pool that failed
    # the 2nd failure of the pool's only node opens its breaker: the route has no usable node
    await publish_usage(nc, "brk-x", route="cloud-b", outcome="error", status=502, node="cloud-b-1", model=M)

    async def tripped() -> bool:
        return (await submit(nc, Submission(job=job(f"brk-{time.monotonic_ns()}", request=prefs)))).pool == "cloud-a"

    assert await eventually(tripped, 5.0)

    async def probed() -> bool:  # after the cooldown one probe goes to cloud-b ...
        return (await submit(nc, Submission(job=job(f"brk-{time.monotonic_ns()}", request=prefs)))).pool == "cloud-b"

    assert await eventually(probed, 5.0, every=0.1)
    assert (await submit(nc, Submission(job=job("brk-after-probe", request=prefs)))).pool == "cloud-a"
    ok = {"ttft_ms": 100, "duration_ms": 500, "tokens": (5, 10), "node": "cloud-b-1", "model": M}
    await publish_usage(nc, "brk-ok", route="cloud-b", outcome="ok", **ok)  # type: ignore[arg-type]

    async def closed() -> bool:  # ... and its success closes the breaker
        return (await submit(nc, Submission(job=job(f"brk-{time.monotonic_ns()}", request=prefs)))).pool == "cloud-b"

    assert await eventually(closed, 5.0)


def test_a_continuation_goes_only_to_routes_that_take_an_assistant_prefix() -> None:
    from schemas.errors import ContinuationUnavailableError

    routes = [r("cheap", input_price=0.1), r("prefill", input_price=5.0, prefill=True)]
    policy = Policy(strategy="cheapest")
    assert pools(rank(routes, policy)) == ["cheap", "prefill"]
    assert pools(rank(routes, policy, continuation=True)) == ["prefill"]

    def choose_for(offered: list[Route], continuation: bool) -> Any:
        return choose(
            [M], lambda m: offered, lambda m: True, lambda m: policy, ProviderPrefs(), continuation=continuation
        )

    assert choose_for(routes, True).route.pool == "prefill"
    with pytest.raises(ContinuationUnavailableError):
        choose_for(routes[:1], True)  # none accepts the prefix: a code of its own, not a plain 503
    assert choose_for(routes[:1], False).route.pool == "cheap"


def test_a_routes_prefill_is_every_nodes() -> None:
    from scheduler.fleet import Fleet
    from schemas.jobs import ModelAdvert, NodeAdvert

    def advert(name: str, prefill: bool) -> NodeAdvert:
        return NodeAdvert(name, "pool", (ModelAdvert(M, assistant_prefill=prefill),), 4, 4)

    fleet = Fleet()
    fleet.observe(advert("a", True), 0.0)
    assert fleet.routes(M, 0.0)[0].prefill
    fleet.observe(advert("b", False), 0.0)  # any node of the pool may pull the job
    assert not fleet.routes(M, 1.0)[0].prefill
    data = ModelAdvert(M, assistant_prefill=True).pack()
    assert ModelAdvert.unpack(data).assistant_prefill and not ModelAdvert.unpack(data[:5]).assistant_prefill
