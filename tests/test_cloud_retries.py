"""Issue 11, cases 6 and 8, on the cloud adapter against real fake providers: a transient error
is tried once more on the same provider, a short Retry-After is waited out, a hung provider
fails at its first-token deadline (long before the read timeout), and health is per model."""

from __future__ import annotations

import time

import pytest

from schemas.errors import NoCapacityError, WorkerFailedError
from tests.fake_provider import Behaviour, FakeProvider
from tests.test_cloud import KEYS, REQUEST, FakeClock, backend_for, model_health, run, text_of
from worker.cloud import FIRST_TOKEN_TIMEOUT


async def test_a_single_500_is_retried_once_on_the_same_provider() -> None:
    async with FakeProvider() as fp, backend_for(fp, keys=KEYS[:1]) as backend:
        fp.script = [Behaviour.error(500)]  # fails once, then serves
        started = time.monotonic()
        assert text_of(await run(backend)) == "Hello, world!"
        assert 0.1 <= time.monotonic() - started < 1.5
        assert fp.chat_keys() == [KEYS[0], KEYS[0]]
        fp.script = [Behaviour.error(503), Behaviour.error(500)]  # twice: the attempt fails over
        with pytest.raises(WorkerFailedError) as e:
            await run(backend)
        assert e.value.code == "upstream_error" and len(fp.chat_requests()) == 4


async def test_a_dropped_connection_before_the_answer_is_retried() -> None:
    async with FakeProvider() as fp, backend_for(fp) as backend:
        fp.script = [Behaviour.dropping(after=0)]
        assert text_of(await run(backend)) == "Hello, world!"
        first, second = fp.chat_requests()  # the first was cut before any text: tried once more
        assert not first.completed and second.completed


async def test_a_429_with_a_short_retry_after_on_the_only_key_is_waited_out() -> None:
    async with FakeProvider() as fp, backend_for(fp, keys=KEYS[:1]) as backend:
        fp.script = [Behaviour(rate_limited_keys=frozenset(KEYS), retry_after=1.0)]
        started = time.monotonic()
        assert text_of(await run(backend)) == "Hello, world!"
        assert 0.9 <= time.monotonic() - started < 2.5
        assert fp.chat_keys() == [KEYS[0], KEYS[0]]


async def test_a_429_longer_than_max_retry_wait_fails_over_at_once() -> None:
    async with FakeProvider() as fp, backend_for(fp, keys=KEYS[:1], max_retry_wait=2) as backend:
        fp.script = [Behaviour(rate_limited_keys=frozenset(KEYS), retry_after=5.0)]
        started = time.monotonic()
        with pytest.raises(NoCapacityError) as e:
            await run(backend)
        assert time.monotonic() - started < 0.5
        assert e.value.code == "upstream_rate_limited" and 4.0 <= (e.value.retry_after or 0) <= 5.0


async def test_a_retry_after_that_would_pass_the_first_token_deadline_is_not_waited() -> None:
    timeouts = {"connect": 1, "first_token": 0.5, "read": 2, "total": 5}
    async with FakeProvider() as fp, backend_for(fp, keys=KEYS[:1], timeouts=timeouts) as backend:
        fp.script = [Behaviour(rate_limited_keys=frozenset(KEYS), retry_after=1.0)]
        with pytest.raises(NoCapacityError):
            await run(backend)
        assert len(fp.chat_requests()) == 1


async def test_a_hung_provider_fails_at_the_first_token_deadline_and_its_model_goes_out() -> None:
    timeouts = {"connect": 1, "first_token": 0.5, "read": 5, "total": 10}
    async with FakeProvider(Behaviour.slow(3.0)) as fp, backend_for(fp, timeouts=timeouts) as backend:
        for i in range(2):
            started = time.monotonic()
            with pytest.raises(WorkerFailedError) as e:
                await run(backend)
            assert 0.45 <= time.monotonic() - started < 1.5  # not the 5 s read timeout
            assert e.value.code == FIRST_TOKEN_TIMEOUT and e.value.status == 502  # retryable
        assert len(fp.chat_requests()) == 2  # a hang is not tried again on the same provider
        # two timeouts in a row: the model is out, advertised so, and jobs on their way handed back
        assert not model_health(backend)["healthy"] and [m.healthy for m in backend.models()] == [False]
        with pytest.raises(NoCapacityError):
            backend.check("tiny", REQUEST)


async def test_a_models_own_first_token_deadline_wins() -> None:
    """A reasoning model thinks before its first text: its route may wait longer."""
    timeouts = {"connect": 1, "first_token": 0.3, "read": 5, "total": 10}
    models = {"tiny": {"id": "upstream-tiny-v1", "first_token": 2}}
    async with (
        FakeProvider(Behaviour.slow(0.8)) as fp,
        backend_for(fp, timeouts=timeouts, models=models) as backend,
    ):
        assert text_of(await run(backend)) == "Hello, world!"


async def test_one_models_errors_leave_the_providers_other_models_serving_and_it_comes_back() -> None:
    clock = FakeClock()
    models = {"tiny": "upstream-tiny-v1", "big": "upstream-big-v1"}
    prices = {"*": {"input": 1.0, "output": 2.0}}
    async with (
        FakeProvider() as fp,
        backend_for(fp, clock=clock, models=models, prices=prices) as backend,
    ):
        fp.per_model = {"upstream-big-v1": Behaviour.error(500)}
        big = {**REQUEST, "model": "big"}
        for _ in range(2):
            with pytest.raises(WorkerFailedError):
                await run(backend, big)
        healthy = {m.id: m.healthy for m in backend.models()}
        assert healthy == {"tiny": True, "big": False} and backend.healthy()
        assert text_of(await run(backend)) == "Hello, world!"  # tiny still serves
        with pytest.raises(NoCapacityError):
            backend.check("big", big)
        fp.per_model = {}  # big recovers upstream
        clock.advance(5.0)  # the cooldown: big is on trial, the next job is its probe
        assert {m.id: m.healthy for m in backend.models()} == {"tiny": True, "big": True}
        assert text_of(await run(backend, big)) == "Hello, world!"
        assert model_health(backend, "big")["healthy"] and not model_health(backend, "big")["on_trial"]
