"""A token cap holds through the whole stack for requests that name no max_tokens (issue 11,
case 9): admission reserves a completion grant and the worker stops at it."""

from __future__ import annotations

import asyncio

import httpx

from tests.helpers import ECHO
from tests.stack import Stack, auth_headers


async def test_an_orgs_day_cap_holds_for_requests_without_max_tokens(echo_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=echo_stack.api_url, headers=auth_headers(), timeout=30) as http:
        r = await http.post("/v1/admin/orgs", json={"name": "capped", "limits": {"tokens_per_day": 100}})
        assert r.status_code == 201, r.text
        r = await http.post("/v1/admin/keys", json={"name": "k", "org": r.json()["id"]})
        assert r.status_code == 201, r.text
        key = r.json()["key"]
        # The echo model would answer 60 tokens each time; the prompt is ~5 (estimated 10).
        body = {"model": ECHO, "messages": [{"role": "user", "content": "hello world [[tokens=60]]"}]}
        answers = []
        for _ in range(8):
            r = await http.post("/v1/chat/completions", json=body, headers=auth_headers(key))
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "insufficient_quota"
                break
            assert r.status_code == 200, r.text
            answers.append(r.json())
            await asyncio.sleep(0.3)  # its usage record settles the reservation
        else:
            raise AssertionError("the day cap never refused a request")
    spent = sum(a["usage"]["total_tokens"] for a in answers)
    assert spent <= 100, [a["usage"] for a in answers]
    assert len(answers) >= 2
    assert answers[-1]["choices"][0]["finish_reason"] == "length"  # cut at what the budget had left
