"""The cloud-adapter backend against real fake providers on 127.0.0.1: relaying, usage and cost,
key rotation and recovery, every upstream failure, health, config validation and key secrecy."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import yaml

from schemas.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    NoCapacityError,
    TokenyardError,
    UnsupportedError,
    WorkerFailedError,
)
from schemas.events import Piece
from tests.fake_provider import Behaviour, FakeProvider
from tests.helpers import wait_until
from worker.backend import Finish, Output, Usage
from worker.cloud import CloudBackend, retry_after_seconds, upstream_body
from worker.cloud_answer import SseDecoder
from worker.keyring import HealthPolicy, Keyring, ProviderHealth
from worker.providers import (
    Price,
    ProviderConfigError,
    fingerprint,
    load_providers,
    parse_providers,
)
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parent.parent
KEYS = ("sk-test-alpha-0001", "sk-test-bravo-0002")
REQUEST: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "Say hello"}]}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def config_for(fp: FakeProvider, *, name: str = "prov-a", keys: tuple[str, ...] = KEYS, **extra: Any) -> dict[str, Any]:
    extra = {
        "models": {"tiny": "upstream-tiny-v1"},
        "prices": {"tiny": {"input": 1.0, "output": 2.0, "cached": 0.5}},
    } | extra
    entry = fp.config_entry(name, keys=keys, **extra)
    entry.setdefault("timeouts", {"connect": 1, "read": 2, "total": 5})
    return {"providers": [entry]}


def parse(data: Any, env: dict[str, str] | None = None) -> Any:
    return parse_providers(data, env=env or {}, read_secret=lambda p: Path(p).read_text())


@asynccontextmanager
async def backend_for(
    fp: FakeProvider, *, clock: FakeClock | None = None, slots: int = 8, **extra: Any
) -> AsyncIterator[CloudBackend]:
    options: dict[str, Any] = {"clock": clock} if clock else {}
    backend = CloudBackend.from_config(parse(config_for(fp, **extra)), "prov-a", slots=slots, **options)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def run(
    backend: CloudBackend, request: dict[str, Any] = REQUEST, into: list[Output] | None = None
) -> list[Output]:
    out = [] if into is None else into
    async for item in backend.generate(request["model"], request):
        out.append(item)
    return out


def model_health(backend: CloudBackend, model: str = "tiny") -> dict[str, Any]:
    return backend.health()["models"][model]  # type: ignore[no-any-return]


def text_of(items: list[Output], index: int = 0) -> str:
    return "".join(i.text for i in items if isinstance(i, Piece) and i.index == index)


# --- relaying -------------------------------------------------------------------------------


async def test_streamed_answer_is_relayed_exactly_with_upstream_usage_and_cost() -> None:
    behaviour = Behaviour(
        chunks=("Hel", "lo", ", wor", "ld ✓"), prompt_tokens=120, completion_tokens=42, cached_tokens=100
    )
    async with FakeProvider(behaviour) as fp, backend_for(fp, headers={"X-Org": "org-7"}) as backend:
        request = {**REQUEST, "stream": False, "temperature": 0.3, "response_format": {"type": "json_object"}}
        backend.check("tiny", request)
        items = await run(backend, request)

        assert items[:-2] == [Piece(0, t, 1) for t in ("Hel", "lo", ", wor", "ld ✓")]
        assert items[-2] == Finish(0, "stop")
        usage = items[-1]
        assert isinstance(usage, Usage)
        assert (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) == (120, 42, 100)
        # 20 uncached prompt tokens at $1, 100 cached at $0.5, 42 completion at $2, per million
        assert usage.cost == pytest.approx((20 * 1.0 + 100 * 0.5 + 42 * 2.0) / 1e6)

        [seen] = fp.chat_requests()
        assert seen.key == KEYS[0]
        assert seen.body["model"] == "upstream-tiny-v1"
        assert seen.body["stream"] is True and seen.body["stream_options"] == {"include_usage": True}
        assert seen.body["temperature"] == 0.3 and seen.body["response_format"] == {"type": "json_object"}
        assert seen.headers["x-org"] == "org-7"
        assert seen.path == "/v1/chat/completions"
        assert model_health(backend)["samples"] == 1 and backend.healthy()


async def test_n_choices_pass_through() -> None:
    async with FakeProvider() as fp, backend_for(fp) as backend:
        items = await run(backend, {**REQUEST, "n": 3})
        assert fp.chat_requests()[0].body["n"] == 3
        for i in range(3):
            assert text_of(items, i) == fp.behaviour.text(i)
        assert {i.index for i in items if isinstance(i, Finish)} == {0, 1, 2}
        assert isinstance(items[-1], Usage) and items[-1].completion_tokens == 4 + 5 + 5


async def test_connections_to_upstream_are_reused() -> None:
    async with FakeProvider() as fp, backend_for(fp) as backend:
        for _ in range(3):
            await run(backend)
        fp.behaviour = Behaviour(ignore_stream=True)
        await run(backend)
        assert len({s.client for s in fp.chat_requests()}) == 1


async def test_whole_json_answer_from_an_upstream_that_ignores_stream() -> None:
    async with FakeProvider(Behaviour(ignore_stream=True, completion_tokens=9)) as fp, backend_for(fp) as backend:
        items = await run(backend)
        assert text_of(items) == "Hello, world!"
        assert items[-2:] == [Finish(0, "stop"), Usage(7, 9, 0, (7 * 1.0 + 9 * 2.0) / 1e6)]


async def test_missing_upstream_usage_is_estimated_and_logged() -> None:
    async with FakeProvider(Behaviour(send_usage=False)) as fp, backend_for(fp) as backend:
        with structlog.testing.capture_logs() as logs:
            items = await run(backend)
        assert text_of(items) == "Hello, world!"
        usage = items[-1]
        assert isinstance(usage, Usage) and usage.completion_tokens == 4 and usage.prompt_tokens > 0
        assert any(e["event"] == "cloud.usage_estimated" for e in logs)


# --- key rotation ---------------------------------------------------------------------------


async def test_429_cools_the_key_the_next_key_serves_and_the_first_recovers() -> None:
    clock = FakeClock()
    limited = Behaviour(rate_limited_keys=frozenset({KEYS[0]}), retry_after=2.0)
    async with FakeProvider(limited) as fp, backend_for(fp, clock=clock) as backend:
        items = await run(backend)
        assert text_of(items) == "Hello, world!"
        assert fp.chat_keys() == [KEYS[0], KEYS[1]]  # one attempt, two keys
        states = {k["fingerprint"]: k for k in backend.health()["keys"]}
        assert states[fingerprint(KEYS[0])]["state"] == "cooling"
        assert states[fingerprint(KEYS[0])]["cooldown_left"] == pytest.approx(2.0)

        await run(backend)  # key 0 still cooling: key 1 again, key 0 not even tried
        assert fp.chat_keys()[2:] == [KEYS[1]]

        fp.behaviour = Behaviour()
        clock.advance(2.1)
        await run(backend)
        await run(backend)
        assert fp.chat_keys()[3:] == [KEYS[0], KEYS[1]]  # recovered: round-robin again
        assert all(k["state"] == "ok" for k in backend.health()["keys"])


async def test_every_key_rate_limited_is_a_retryable_503_with_retry_after() -> None:
    clock = FakeClock()
    limited = Behaviour(rate_limited_keys=frozenset(KEYS), retry_after=3.0)
    async with FakeProvider(limited) as fp, backend_for(fp, clock=clock) as backend:
        items: list[Output] = []
        with pytest.raises(NoCapacityError) as e:
            await run(backend, into=items)
        assert items == []
        assert e.value.status == 503 and e.value.retry_after == pytest.approx(3.0)
        assert fp.chat_keys() == list(KEYS)
        assert not backend.healthy()
        clock.advance(1.0)
        with pytest.raises(NoCapacityError) as e:  # nothing sent while every key cools down
            await run(backend)
        assert e.value.retry_after == pytest.approx(2.0) and len(fp.chat_keys()) == 2


async def test_429_without_retry_after_backs_off_exponentially() -> None:
    clock = FakeClock()
    async with (
        FakeProvider(Behaviour(rate_limited_keys=frozenset(KEYS[:1]))) as fp,
        backend_for(fp, clock=clock, keys=KEYS[:1]) as backend,
    ):
        cooldowns = []
        for _ in range(3):
            with pytest.raises(NoCapacityError) as e:
                await run(backend)
            cooldowns.append(e.value.retry_after)
            clock.advance(100)
        assert cooldowns == [1.0, 2.0, 4.0]


async def test_401_revokes_the_key_with_an_alert_and_the_next_key_serves() -> None:
    async with FakeProvider(Behaviour(rejected_keys=frozenset({KEYS[0]}))) as fp, backend_for(fp) as backend:
        with structlog.testing.capture_logs() as logs:
            assert text_of(await run(backend)) == "Hello, world!"
            await run(backend)
            await run(backend)
        assert fp.chat_keys() == [KEYS[0], KEYS[1], KEYS[1], KEYS[1]]
        [alert] = [e for e in logs if e["event"] == "cloud.key_revoked"]
        assert alert["alert"] is True and alert["key"] == fingerprint(KEYS[0]) and alert["status"] == 401
        assert [k["state"] for k in backend.health()["keys"]] == ["revoked", "ok"]

        fp.behaviour = Behaviour(rejected_keys=frozenset(KEYS))
        with pytest.raises(WorkerFailedError) as e:
            await run(backend)
        assert e.value.code == "upstream_keys_revoked"
        assert not backend.healthy()
        with pytest.raises(WorkerFailedError):
            await run(backend)
        assert len(fp.chat_keys()) == 5  # no key left to send with


# --- upstream failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "code", "tries"),
    [
        (Behaviour.down(), "upstream_unreachable", 2),  # refused and 5xx: tried once more here
        (Behaviour.error(500), "upstream_error", 2),
        (Behaviour.error(503, retry_after=1), "upstream_error", 2),
        (Behaviour.error(404, "no such model"), "upstream_error", 1),
        (Behaviour.garbled(), "upstream_malformed", 1),
        (Behaviour.garbled(b"<html>502 Bad Gateway</html>"), "upstream_disconnected", 1),
        (Behaviour.garbled(b'data: {"choices": "nope"}\n\n'), "upstream_malformed", 1),
        (Behaviour.garbled(b'data: {"error": {"message": "overloaded"}}\n\n'), "upstream_error", 1),
        (Behaviour(send_done=False, send_usage=False, finish_reason="stop", chunks=()), "upstream_disconnected", 1),
        (Behaviour.slow(5.0), "upstream_timeout", 1),  # a hang is not tried again: it moves
    ],
    ids=["down", "500", "503", "404", "garbage", "html", "bad-choices", "error-event", "no-end", "slow"],
)
async def test_upstream_failure_before_any_text_is_a_retryable_error(
    behaviour: Behaviour, code: str, tries: int
) -> None:
    async with (
        FakeProvider(behaviour) as fp,
        backend_for(fp, timeouts={"connect": 1, "read": 0.3, "total": 5}) as backend,
    ):
        items: list[Output] = []
        started = time.monotonic()
        with pytest.raises(TokenyardError) as e:
            await run(backend, into=items)
        assert time.monotonic() - started < 2.0
        assert items == []
        assert type(e.value) is WorkerFailedError and e.value.status == 502 and e.value.code == code
        assert model_health(backend)["errors"] == tries
        if behaviour.mode != "down":
            assert len(fp.chat_requests()) == tries


async def test_mid_stream_disconnect_fails_after_the_text_already_relayed() -> None:
    async with FakeProvider(Behaviour.dropping(after=2)) as fp, backend_for(fp) as backend:
        items: list[Output] = []
        with pytest.raises(WorkerFailedError) as e:
            await run(backend, into=items)
        assert e.value.code == "upstream_disconnected"
        assert items == [Piece(0, "Hello", 1), Piece(0, ",", 1)]


async def test_a_stream_slower_than_the_total_timeout_is_cut() -> None:
    async with (
        FakeProvider(Behaviour(chunks=("x",) * 20, chunk_delay=0.1)) as fp,
        backend_for(fp, timeouts={"connect": 0.5, "read": 0.5, "total": 0.5}) as backend,
    ):
        items: list[Output] = []
        with pytest.raises(WorkerFailedError) as e:
            await run(backend, into=items)
        assert e.value.code == "upstream_timeout"
        assert 2 <= len(items) < 20
        assert await wait_until(lambda: fp.disconnects == 1, 3)


async def test_upstream_400_is_the_clients_error_with_upstreams_message() -> None:
    bad = Behaviour.error(400, "Invalid 'temperature': must be at most 2.")
    async with FakeProvider(bad) as fp, backend_for(fp) as backend:
        with pytest.raises(InvalidRequestError) as e:
            await run(backend)
        assert e.value.status == 400 and e.value.message == "Invalid 'temperature': must be at most 2."
        fp.behaviour = Behaviour.error(
            400, "This model's maximum context length is 8 tokens.", code="context_length_exceeded"
        )
        with pytest.raises(ContextLengthError):
            await run(backend)
        assert fp.chat_keys() == [KEYS[0], KEYS[1]]  # no other key is tried for a bad request
        assert backend.healthy() and model_health(backend)["errors"] == 0


async def test_closing_the_iterator_closes_the_upstream_request() -> None:
    async with FakeProvider(Behaviour(chunks=("tick",) * 50, chunk_delay=0.05)) as fp, backend_for(fp) as backend:
        stream = backend.generate("tiny", REQUEST)
        first = await stream.__anext__()
        assert first == Piece(0, "tick", 1)
        assert backend.health()["in_flight"] == 1
        await stream.aclose()  # type: ignore[attr-defined]
        assert await wait_until(lambda: fp.disconnects == 1, 3)
        assert not fp.chat_requests()[0].completed
        assert backend.health()["in_flight"] == 0
        fp.behaviour = Behaviour()
        assert text_of(await run(backend)) == "Hello, world!"  # the backend is still fine


async def test_cancelling_the_consuming_task_closes_the_upstream_request() -> None:
    """How the runtime stops a job: it cancels the task, then closes the iterator."""
    async with FakeProvider(Behaviour(chunks=("tick",) * 50, chunk_delay=0.05)) as fp, backend_for(fp) as backend:
        got: list[Output] = []

        async def consume() -> None:
            stream = backend.generate("tiny", REQUEST)
            try:
                async for item in stream:
                    got.append(item)
            finally:
                await stream.aclose()  # type: ignore[attr-defined]

        task = asyncio.create_task(consume())
        assert await wait_until(lambda: len(got) >= 2, 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_until(lambda: fp.disconnects == 1, 3)
        assert backend.health()["in_flight"] == 0 and model_health(backend)["errors"] == 0


async def test_several_fakes_at_once_a_failing_one_and_a_serving_one() -> None:
    """The shape of a failover: A fails before any text with a retryable error, B serves."""
    async with (
        FakeProvider(Behaviour.down()) as a,
        FakeProvider(Behaviour(chunks=("from B",))) as b,
        backend_for(a) as on_a,
        backend_for(b) as on_b,
    ):
        assert a.port != b.port
        items: list[Output] = []
        with pytest.raises(WorkerFailedError) as e:
            await run(on_a, into=items)
        assert e.value.status >= 500 and items == []
        assert text_of(await run(on_b)) == "from B"
        await a.aset(Behaviour(chunks=("from A",)))  # A comes back on the same port
        assert text_of(await run(on_a)) == "from A"


# --- health ---------------------------------------------------------------------------------


async def test_probe_and_passive_health_follow_the_provider_down_and_back() -> None:
    async with FakeProvider() as fp, backend_for(fp, probe_interval=0.05) as backend:
        assert await wait_until(lambda: any(s.path == "/v1/models" for s in fp.requests), 3)
        probe = next(s for s in fp.requests if s.path == "/v1/models")
        assert probe.key == KEYS[0]
        assert await wait_until(lambda: backend.health()["probe"]["ok"] is True, 3)
        assert backend.healthy()

        await fp.aset(Behaviour.down())
        assert await wait_until(lambda: not backend.healthy(), 3)
        assert backend.health()["probe"]["ok"] is False

        await fp.aset(Behaviour())
        assert await wait_until(backend.healthy, 3)
        assert text_of(await run(backend)) == "Hello, world!"
        assert fp.chat_keys() == [KEYS[0]]  # probes do not move the rotation


async def test_probe_marks_a_5xx_provider_unhealthy() -> None:
    async with FakeProvider(Behaviour(models_status=503)) as fp, backend_for(fp) as backend:
        assert await backend.probe() is False and not backend.healthy()
        fp.behaviour = Behaviour()
        assert await backend.probe() is True and backend.healthy()


async def test_passive_error_rate_takes_the_model_out_not_the_provider() -> None:
    async with FakeProvider(Behaviour.error(502)) as fp, backend_for(fp) as backend:
        for _ in range(2):  # each tried twice: four failures
            with pytest.raises(WorkerFailedError):
                await run(backend)
        assert not model_health(backend)["healthy"] and [m.healthy for m in backend.models()] == [False]
        assert backend.healthy()  # the provider answers: only this model is out
        with pytest.raises(NoCapacityError) as e:  # a job already on its way is handed back at once
            backend.check("tiny", REQUEST)
        assert e.value.code == "upstream_unhealthy" and len(fp.chat_requests()) == 4


# --- check, construction --------------------------------------------------------------------


async def test_check_refuses_only_an_unknown_model_or_an_api_the_provider_does_not_serve() -> None:
    async with FakeProvider() as fp, backend_for(fp) as backend:
        with pytest.raises(ModelNotFoundError):
            backend.check("other", {**REQUEST, "model": "other"})
        tools = [{"type": "function", "function": {"name": "f"}}]
        backend.check("tiny", {**REQUEST, "tools": tools, "tool_choice": "required", "logprobs": True})
        backend.check(
            "tiny",
            {
                **REQUEST,
                "tools": tools,
                "tool_choice": "none",
                "seed": 3,
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}
                ],
            },
        )
        # no `endpoints` in its entry: chat only
        for task, key in (("completion", "prompt"), ("embedding", "input")):
            with pytest.raises(UnsupportedError, match="does not serve"):
                backend.check("tiny", {"model": "tiny", "tokenyard_task": task, key: ["x"]})


def test_from_settings_reads_the_file_and_caps_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "key2").write_text("sk-from-file-2\n")
    (tmp_path / "p.yaml").write_text(
        yaml.safe_dump(
            {
                "providers": [
                    {
                        "name": "prov-a",
                        "base_url": "http://127.0.0.1:9/v1",
                        "max_concurrency": 4,
                        "api_keys": [{"env": "TY_TEST_KEY_1"}, {"file": "key2"}],
                        "models": {"tiny": {"id": "upstream-tiny", "context_length": 8192}, "big": "upstream-big"},
                    }
                ]
            },
            sort_keys=False,
        )
    )
    settings = WorkerSettings.from_args(
        ["--backend", "cloud", "--providers", str(tmp_path / "p.yaml"), "--provider", "prov-a"]
    )
    assert settings.pool == "prov-a" and settings.slots == 32
    with pytest.raises(ProviderConfigError, match="TY_TEST_KEY_1"):
        CloudBackend.from_settings(settings)
    monkeypatch.setenv("TY_TEST_KEY_1", "sk-from-env-1")
    backend = CloudBackend.from_settings(settings)
    assert backend.slots == 4
    assert [k.reveal() for k in backend.provider.keys] == ["sk-from-env-1", "sk-from-file-2"]
    assert [(m.id, m.context_length, m.owned_by) for m in backend.models()] == [
        ("tiny", 8192, "prov-a"),
        ("big", 0, "prov-a"),
    ]
    with pytest.raises(ProviderConfigError, match="known: prov-a"):
        CloudBackend.from_config(load_providers(tmp_path / "p.yaml", env={"TY_TEST_KEY_1": "k"}), "nope")


def test_the_example_config_is_valid() -> None:
    path = REPO / "deploy" / "providers.example.yaml"
    names = yaml.safe_load(path.read_text())
    env = {
        k["env"]: "sk-example" + str(i)
        for p in names["providers"]
        for i, k in enumerate(p["api_keys"])
        if isinstance(k, dict) and "env" in k
    }
    config = load_providers(path, env=env)
    assert len(config.providers) >= 2
    assert all(p.price(m) is not None for p in config.providers for m in p.models)


# --- keys never leak ------------------------------------------------------------------------


async def test_keys_never_reach_logs_errors_or_health(caplog: pytest.LogCaptureFixture) -> None:
    buffer = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(buffer),
        cache_logger_on_first_use=False,
    )
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    try:
        # The fake quotes the rejected key in its 401 message, as real providers partly do.
        behaviour = Behaviour(rejected_keys=frozenset({KEYS[0]}), rate_limited_keys=frozenset({KEYS[1]}))
        keys = (*KEYS, "sk-test-charlie-0003")
        async with FakeProvider(behaviour) as fp, backend_for(fp, keys=keys, probe_interval=0.05) as backend:
            await run(backend)
            for b in (
                Behaviour.error(500),
                Behaviour.garbled(),
                Behaviour.error(400, f"bad, you sent {KEYS[1]}"),
                Behaviour(rejected_keys=frozenset(keys)),
            ):
                fp.behaviour = b
                try:
                    await run(backend)
                except TokenyardError as e:
                    errors.append(repr(e) + json.dumps(e.to_wire()) + json.dumps(e.body()))
            await wait_until(lambda: backend.health()["probe"]["ok"] is not None, 3)
            snapshot = json.dumps(backend.health())
            provider = repr(backend.provider)
    finally:
        structlog.reset_defaults()
    logged = buffer.getvalue() + "\n".join(r.getMessage() for r in caplog.records)
    assert "cloud.key_revoked" in logged and "cloud.key_cooled" in logged and len(errors) == 4
    for key in keys:
        for tail in (key, key[-8:]):
            assert tail not in logged and tail not in snapshot and tail not in provider
            assert not any(tail in e for e in errors)


# --- config validation (pure) ---------------------------------------------------------------


def provider_dict(**changes: Any) -> dict[str, Any]:
    base = {
        "name": "openai",
        "base_url": "https://api.openai.com/v1",
        "api_keys": [{"env": "K1"}],
        "models": {"gpt": "gpt-4o-mini"},
        "prices": {"*": {"input": 0.15, "output": 0.6}},
    }
    base.update(changes)
    return {"providers": [{k: v for k, v in base.items() if v is not None}]}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"base_url": "http://api.example.com/v1"}, "plain http is allowed only for loopback"),
        ({"base_url": "http://10.0.0.1:8000/v1"}, "plain http is allowed only for loopback"),
        ({"base_url": "http://localhost.evil.com/v1"}, "plain http is allowed only for loopback"),
        ({"base_url": "ftp://x/v1"}, "must be an http"),
        ({"base_url": "https://user:pw@api.example.com/v1"}, "must not hold credentials"),
        ({"base_url": None}, "base_url: required"),
        ({"name": "Bad_Name"}, "not a valid pool name"),
        ({"name": "-lead"}, "not a valid pool name"),
        ({"name": "x" * 64}, "not a valid pool name"),
        ({"api_keys": [{"env": "MISSING_VAR"}]}, "environment variable MISSING_VAR is not set"),
        ({"api_keys": [{"env": "EMPTY"}]}, "environment variable EMPTY is not set or empty"),
        ({"api_keys": [{"file": "/nonexistent/key"}]}, "cannot read key file"),
        ({"api_keys": [{"env": "K1", "file": "x"}]}, "exactly one of"),
        ({"api_keys": [{"vault": "x"}]}, "unknown key 'vault'"),
        ({"api_keys": []}, "at least one key"),
        ({"modles": {"a": "b"}}, "unknown key 'modles' (allowed: name, base_url"),
        ({"models": {}}, "map at least one"),
        ({"prices": {"gpt": {"input": 1, "output": 1, "cahced": 1}}}, "unknown key 'cahced'"),
        ({"prices": {"other": {"input": 1, "output": 1}}}, "not a public model id"),
        ({"prices": {"gpt": {"input": -1, "output": 1}}}, "must be a number >= 0"),
        ({"timeouts": {"connect": 1, "reed": 2}}, "unknown key 'reed'"),
        ({"timeouts": {"read": 100, "total": 10}}, "must not exceed total"),
        ({"headers": {"Authorization": "Bearer x"}}, "set by the adapter"),
        ({"headers": {"X-A": "a\r\nHost: evil"}}, "control characters"),
        ({"max_concurrency": 0}, "max_concurrency"),
    ],
)
def test_invalid_provider_configs_are_rejected_clearly(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ProviderConfigError) as e:  # a key that cannot be read: when its adapter asks
        parse(provider_dict(**changes), env={"K1": "sk-1", "EMPTY": " "}).get("openai")
    assert message in str(e.value)
    assert "sk-1" not in str(e.value)


def test_top_level_and_duplicate_problems_are_rejected() -> None:
    with pytest.raises(ProviderConfigError, match="unknown key 'provider'"):
        parse({"provider": []})
    with pytest.raises(ProviderConfigError, match="non-empty list"):
        parse({"providers": []})
    twice = provider_dict()["providers"] * 2
    with pytest.raises(ProviderConfigError, match="more than once"):
        parse({"providers": twice}, env={"K1": "a"})


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "http://127.3.4.5/v1",
        "http://localhost:1/v1/",
        "http://[::1]:8080/v1",
        "https://10.0.0.1/v1",
        "https://api.example.com",
    ],
)
def test_loopback_http_and_any_https_are_accepted(url: str) -> None:
    provider = parse(provider_dict(base_url=url), env={"K1": "sk-1"}).providers[0]
    assert provider.base_url == url.rstrip("/")


def test_literal_keys_work_with_a_warning_and_repr_hides_keys() -> None:
    config = parse(provider_dict(api_keys=["sk-literal-123", {"env": "K1"}, "sk-literal-123"]), env={"K1": "sk-env"})
    provider = config.providers[0]
    assert [k.reveal() for k in provider.keys] == ["sk-literal-123", "sk-env"]
    assert any("literal key" in w for w in config.warnings)
    assert any("same key" in w for w in config.warnings)
    assert "sk-" not in repr(provider) and "sk-" not in str(provider.keys[0])


def test_prices_cost_and_defaults() -> None:
    config = parse(
        provider_dict(
            models={"a": "x", "b": "y"},
            prices={"a": {"input": 3, "output": 15}, "*": {"input": 1, "output": 2, "cached": 0.1}},
        ),
        env={"K1": "k"},
    )
    p = config.providers[0]
    assert p.price("a") == Price(3.0, 15.0, 3.0)  # without a cached price, cached costs as input
    assert p.price("b") == Price(1.0, 2.0, 0.1)
    assert Price(1.0, 2.0, 0.1).cost(1000, 500, 400) == pytest.approx((600 + 40 + 1000) / 1e6)
    assert p.timeouts.connect == 5.0 and p.probe_interval == 30.0
    unpriced = parse(provider_dict(prices=None), env={"K1": "k"})
    assert unpriced.providers[0].price("gpt") is None and unpriced.warnings


# --- pure pieces ----------------------------------------------------------------------------


def test_keyring_rotates_cools_recovers_and_revokes() -> None:
    clock = FakeClock()
    ring = Keyring(["a", "b", "c"], clock=clock, base_cooldown=1.0, max_cooldown=10.0)
    assert [ring.pick() for _ in range(4)] == [0, 1, 2, 0]
    assert ring.cool(1, retry_after=5.0) == 5.0
    ring.revoke(2)
    assert [ring.pick() for _ in range(3)] == [0, 0, 0]
    assert ring.peek() == 0 and ring.ready_in() == 0
    assert ring.cool(0, retry_after=500.0) == 10.0  # capped
    assert ring.pick() is None and ring.ready_in() == pytest.approx(5.0)
    clock.advance(5.0)
    assert ring.pick() == 1 and ring.pick(exclude=frozenset({1})) is None
    ring.revoke(0)
    ring.revoke(1)
    assert ring.ready_in() is None and not ring.usable()


def test_model_health_is_a_breaker_per_model_and_the_probe_is_the_providers() -> None:
    clock = FakeClock()
    policy = HealthPolicy(window=10.0, max_error_rate=0.5, min_samples=4, timeouts=2, cooldown=5.0, max_cooldown=12.0)
    health = ProviderHealth(clock=clock, policy=policy)
    tiny, other = health.model("tiny"), health.model("other")
    for ok in (False, False, True):
        tiny.record(ok)
    assert tiny.healthy()  # too few samples to judge
    tiny.record(True)
    assert tiny.healthy()  # 2 of 4 failed: not above 0.5
    tiny.record(False)
    assert not tiny.healthy() and other.healthy()  # 3 of 5: out; the other model is not
    clock.advance(5.0)
    assert tiny.healthy() and tiny.snapshot()["on_trial"]  # the cooldown passed: the next job is the probe
    tiny.record(False)  # the probe failed: out for twice as long
    clock.advance(9.9)
    assert not tiny.healthy()
    clock.advance(0.2)
    assert tiny.healthy()
    tiny.record(False)
    clock.advance(11.9)
    assert not tiny.healthy()  # 20 s, capped at 12
    clock.advance(0.2)
    assert tiny.healthy()
    tiny.record(True)  # recovered: in, and the cooldown back to 5 s
    assert tiny.healthy() and not tiny.snapshot()["on_trial"]
    other.record(False, timeout=True)
    assert other.healthy()
    other.record(False, timeout=True)  # two first-token timeouts in a row: out at once
    assert not other.healthy() and tiny.healthy()
    clock.advance(5.0)
    assert other.healthy()
    health.probed(False, 0.01)
    assert not health.healthy()
    health.probed(True, 0.01)
    assert health.healthy()


def test_retry_after_parsing() -> None:
    assert retry_after_seconds(httpx.Headers({"retry-after-ms": "1500", "retry-after": "2"})) == 1.5
    assert retry_after_seconds(httpx.Headers({"retry-after": "7"})) == 7.0
    date = httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert retry_after_seconds(date, now=1445412470.0) == pytest.approx(10.0)
    assert retry_after_seconds(httpx.Headers({"retry-after": "soon"})) is None
    assert retry_after_seconds(httpx.Headers({})) is None


def test_sse_decoder_handles_any_split_and_rejects_oversized_events() -> None:
    stream = b': keep-alive\r\n\r\ndata: {"a":1}\r\n\r\nevent: x\ndata: line1\ndata: line2\n\ndata: [DONE]\n\n'
    for size in (1, 3, 7, len(stream)):
        decoder = SseDecoder()
        events = [e for i in range(0, len(stream), size) for e in decoder.feed(stream[i : i + size])]
        assert events == ['{"a":1}', "line1\nline2", "[DONE]"]
    with pytest.raises(WorkerFailedError, match="larger than the limit"):
        SseDecoder(limit=100).feed(b"data: " + b"x" * 200)


def test_upstream_body_maps_the_model_and_forces_streamed_usage() -> None:
    body = upstream_body({**REQUEST, "stream": False, "stream_options": {"include_usage": False}, "n": 2}, "up-1")
    assert body == {
        "model": "up-1",
        "messages": REQUEST["messages"],
        "n": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
