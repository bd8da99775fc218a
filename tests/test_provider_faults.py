"""Issue 11, cases 6 and 8, through the whole stack: cloud adapters in front of fake providers.

- A provider that hangs (its process SIGSTOPped: connections open, nothing answered) costs a
  request its first-token deadline, not the read timeout: the job moves to the other provider,
  and after two timeouts the hung provider's model is advertised out and avoided at once.
- One model failing at a provider leaves that provider's other models serving (health per
  (pool, model)); the failing model's jobs go to the provider that serves it well.
- A 429 with a short Retry-After on a provider's only key is waited out there.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fake_provider import Behaviour, FakeProvider
from tests.helpers import sdk, wait_rows
from tests.stack import Proc, Stack, auth_headers

MODEL = "fake-model"
FIRST_TOKEN = 1.0


async def fake_provider_process(stack: Stack, *args: str) -> tuple[Proc, int]:
    """`tests.fake_provider` as its own process (so it can be stopped), and its port."""
    proc = stack.spawn("fake-provider", "tests.fake_provider", {}, list(args))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"^port (\d+)$", proc.output(), re.M)
        if found:
            return proc, int(found.group(1))
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the fake provider did not start:\n{proc.output()}")


def adapter(stack: Stack, providers: Path, name: str) -> Proc:
    return stack.start_worker(
        TOKENYARD_BACKEND="cloud",
        TOKENYARD_PROVIDERS=str(providers),
        TOKENYARD_PROVIDER=name,
        TOKENYARD_NODE_ID=f"node-{name}",
        TOKENYARD_SLOTS="16",
    )


def entry(name: str, url: str, models: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "base_url": url,
        "api_keys": [f"sk-{name}"],
        "models": models,
        "probe_interval": 0,
        "timeouts": {"connect": 1, "first_token": FIRST_TOKEN, "read": 8, "total": 30},
    } | extra


async def test_a_hung_provider_costs_the_first_token_deadline_and_is_then_avoided(stack: Stack, tmp_path: Path) -> None:
    hung, port = await fake_provider_process(stack, "--models", MODEL, "--chunks", '["from A"]')
    async with FakeProvider(Behaviour(chunks=("from B",)), models=(MODEL,)) as b:
        providers = tmp_path / "providers.yaml"
        providers.write_text(
            yaml.safe_dump(
                {
                    "providers": [
                        entry("prov-a", f"http://127.0.0.1:{port}/v1", {MODEL: MODEL}),
                        entry("prov-b", b.base_url, {MODEL: MODEL}),
                    ]
                }
            )
        )
        adapter(stack, providers, "prov-a")
        adapter(stack, providers, "prov-b")
        await stack.start_api()
        await stack.wait_for_model(MODEL, nodes=2)
        prefer_a = {"provider": {"order": ["prov-a", "prov-b"]}}
        async with sdk(stack) as client:
            r = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], extra_body=prefer_a
            )
            assert r.choices[0].message.content == "from A"  # A is first while it answers
            hung.signal(signal.SIGSTOP)
            try:
                took = []
                for i in range(8):
                    started = time.monotonic()
                    r = await client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"q{i}"}], extra_body=prefer_a
                    )
                    took.append(time.monotonic() - started)
                    assert r.choices[0].message.content == "from B"
                # each within the first-token deadline and a margin, never the 8 s read timeout
                assert max(took) < FIRST_TOKEN + 2.5, took
                async with httpx.AsyncClient(base_url=stack.api_url, headers=auth_headers(), timeout=30) as http:
                    rows = await wait_rows(http, 9)
            finally:
                hung.signal(signal.SIGCONT)
    answered = sorted((r for r in rows if r["route"] == "prov-b"), key=lambda r: r["time"])
    assert len(answered) == 8 and all(r["outcome"] == "ok" for r in answered)
    # two timeouts on A take its model out: from then on the jobs go to B at once
    assert [r["attempts"] for r in answered[:2]] == [2, 2]
    assert all(r["attempts"] == 1 for r in answered[2:]), [r["attempts"] for r in answered]


async def test_one_failing_model_leaves_the_providers_other_models_serving(stack: Stack, tmp_path: Path) -> None:
    good, bad = "m-good", "m-bad"
    async with (
        FakeProvider(Behaviour(chunks=("from A",)), models=(good, bad)) as a,
        FakeProvider(Behaviour(chunks=("from B",)), models=(bad,)) as b,
    ):
        a.per_model = {bad: Behaviour.error(500)}  # A fails for one of its models only
        providers = tmp_path / "providers.yaml"
        providers.write_text(
            yaml.safe_dump(
                {
                    "providers": [
                        entry("prov-a", a.base_url, {good: good, bad: bad}),
                        entry("prov-b", b.base_url, {bad: bad}),
                    ]
                }
            )
        )
        adapter(stack, providers, "prov-a")
        adapter(stack, providers, "prov-b")
        await stack.start_api()
        await stack.wait_for_model(bad, nodes=2)
        prefer_a = {"provider": {"order": ["prov-a", "prov-b"]}}
        async with sdk(stack) as client:
            for i in range(4):  # the failing model first: its errors alone are A's recent traffic
                r_bad = await client.chat.completions.create(
                    model=bad, messages=[{"role": "user", "content": f"b{i}"}], extra_body=prefer_a
                )
                assert r_bad.choices[0].message.content == "from B"
            await asyncio.sleep(0.5)  # a few adverts later
            for i in range(6):
                r_good = await client.chat.completions.create(
                    model=good, messages=[{"role": "user", "content": f"g{i}"}]
                )
                assert r_good.choices[0].message.content == "from A"  # never taken out with it
    # A was tried for the failing model until its model went out (each try retried once there)
    tried_bad_on_a = [s for s in a.chat_requests() if s.body["model"] == bad]
    assert 2 <= len(tried_bad_on_a) <= 4
    assert len([s for s in a.chat_requests() if s.body["model"] == good]) == 6


async def test_a_short_retry_after_on_the_only_key_is_waited_out(stack: Stack, tmp_path: Path) -> None:
    async with FakeProvider(Behaviour(chunks=("patience",)), models=(MODEL,)) as a:
        providers = tmp_path / "providers.yaml"
        timeouts = {"connect": 1, "first_token": 5, "read": 8, "total": 30}  # room for a 1 s wait
        config = {"providers": [entry("prov-a", a.base_url, {MODEL: MODEL}, timeouts=timeouts)]}
        providers.write_text(yaml.safe_dump(config))
        adapter(stack, providers, "prov-a")
        await stack.start_api()
        await stack.wait_for_model(MODEL)
        a.script = [Behaviour(rate_limited_keys=frozenset({"sk-prov-a"}), retry_after=1.0)]
        async with sdk(stack) as client:
            started = time.monotonic()
            r = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
            took = time.monotonic() - started
    assert r.choices[0].message.content == "patience"
    assert 0.9 <= took < 4.0
    assert len(a.chat_requests()) == 2
