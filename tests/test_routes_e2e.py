"""The product's smoke test across routes: provider A, provider B and an own node each answer
the same model; A goes down and traffic fails over without any change on the client; the same
prompt's cost is compared across routes in the ledger."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fake_provider import Behaviour, FakeProvider
from tests.helpers import admin, sdk, wait_rows
from tests.stack import Stack

MODEL = "gpt-test"
ASK = [{"role": "user", "content": "hello routes"}]


async def ask(client: Any, provider: dict[str, Any]) -> Any:
    r = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, max_tokens=5, extra_body={"provider": provider}
    )
    return r.parse()


async def test_every_route_answers_and_a_down_provider_fails_over(stack: Stack, tmp_path: Path) -> None:
    async with FakeProvider(models=(MODEL,)) as a, FakeProvider(models=(MODEL,)) as b:
        config = {
            "providers": [
                a.config_entry("prov-a", prices={MODEL: {"input": 1.0, "output": 2.0}}),
                b.config_entry("prov-b", prices={MODEL: {"input": 3.0, "output": 6.0}}),
            ]
        }
        providers = tmp_path / "providers.yaml"
        providers.write_text(yaml.safe_dump(config))
        for name in ("prov-a", "prov-b"):
            stack.start_worker(
                TOKENYARD_BACKEND="cloud",
                TOKENYARD_PROVIDERS=str(providers),
                TOKENYARD_PROVIDER=name,
                TOKENYARD_NODE_ID=f"cloud-{name}",
            )
        stack.start_worker(TOKENYARD_MODELS=MODEL, TOKENYARD_NODE_ID="own-1")
        await stack.start_api()
        await stack.wait_for_model(MODEL, nodes=3)
        async with sdk(stack) as client, httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
            # a 200 from every route
            via_a = await ask(client, {"only": ["prov-a"]})
            via_b = await ask(client, {"only": ["prov-b"]})
            via_own = await ask(client, {"only": ["own"]})
            assert via_a.choices[0].message.content == via_b.choices[0].message.content == "Hello, world!"
            assert via_own.choices[0].message.content == "hello routes hello routes hello"
            # provider A goes down: the same request (A first, then B) is served by B
            await a.aset(Behaviour.down())
            started = time.monotonic()
            failed_over = await ask(client, {"order": ["prov-a", "prov-b"]})
            assert failed_over.choices[0].message.content == "Hello, world!"
            assert time.monotonic() - started < 10
            # A answers 503s: B, and with B down too, the own node as the last resort
            await a.aset(Behaviour.error(503))
            await b.aset(Behaviour.down())
            last_resort = await ask(client, {"order": ["prov-a", "prov-b", "own"]})
            assert last_resort.choices[0].message.content == "hello routes hello routes hello"
            rows = {row["job_id"]: row for row in await wait_rows(http, 5)}
            by_route = {
                row["route"]: row
                for row in (await admin(http, "GET", "/usage", params={"group_by": "route"})).json()["data"]
            }
        route = {
            name: rows[r.id.removeprefix("chatcmpl-")]
            for name, r in (
                ("a", via_a),
                ("b", via_b),
                ("own", via_own),
                ("failover", failed_over),
                ("last", last_resort),
            )
        }
        assert (route["a"]["route"], route["b"]["route"], route["own"]["route"]) == ("prov-a", "prov-b", "own")
        assert route["failover"]["route"] == "prov-b" and route["failover"]["attempts"] >= 2
        assert route["last"]["route"] == "own"
        # the same prompt costs what each route's price table says: B three times A, own nothing
        tokens = (via_a.usage.prompt_tokens, via_a.usage.completion_tokens)
        assert route["a"]["cost"] == (tokens[0] * 1.0 + tokens[1] * 2.0) / 1e6
        assert abs(route["b"]["cost"] - 3 * route["a"]["cost"]) < 1e-12
        assert route["own"]["cost"] == 0.0
        assert set(by_route) == {"prov-a", "prov-b", "own"}


async def test_provider_health_changes_and_prices_are_audited_once(stack: Stack, tmp_path: Path) -> None:
    async with FakeProvider(models=(MODEL,)) as a:
        entry = a.config_entry("prov-a", prices={MODEL: {"input": 1.5, "output": 4.0}}, probe_interval=0.1)
        providers = tmp_path / "providers.yaml"
        providers.write_text(yaml.safe_dump({"providers": [entry]}))
        stack.start_worker(
            TOKENYARD_BACKEND="cloud",
            TOKENYARD_PROVIDERS=str(providers),
            TOKENYARD_PROVIDER="prov-a",
            TOKENYARD_NODE_ID="cloud-a",
        )
        await stack.start_api()
        await stack.start_api(ledger_name="replica-2", data_dir=str(stack.tmp / "data-2"))  # sees the same adverts
        await stack.wait_for_model(MODEL)
        async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:

            async def actions(want: list[str]) -> list[dict[str, Any]]:
                deadline = time.monotonic() + 15
                events: list[dict[str, Any]] = []
                while time.monotonic() < deadline:
                    events = [
                        e for e in (await admin(http, "GET", "/audit")).json()["data"] if e["target"] == "cloud-a"
                    ]
                    if [e["action"] for e in events] == want:
                        return events
                    await asyncio.sleep(0.1)
                raise AssertionError(f"audit shows {[e['action'] for e in events]}, expected {want}")

            joined = (await actions(["node.join"]))[0]
            assert joined["detail"]["prices"] == {MODEL: {"input": 1.5, "output": 4.0}}
            assert joined["detail"]["kind"] == "cloud" and joined["detail"]["pool"] == "prov-a"
            await a.aset(Behaviour.down())
            await actions(["node.join", "node.unhealthy"])
            await a.aset(Behaviour())
            await actions(["node.join", "node.unhealthy", "node.healthy"])
