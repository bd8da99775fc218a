"""Bring your own engine: a worker fronting an OpenAI-compatible server on its own loopback
(`--engine-url`), with `tests/fake_provider.py` as that engine (a real HTTP server on
127.0.0.1) and the official `openai` SDK as the client through the whole stack."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from tests.fake_provider import Behaviour, FakeProvider
from tests.helpers import Sse, watch_adverts
from tests.stack import ADMIN_KEY, Stack
from worker.engine_url import NO_KEY, EngineError, engine_base_url, list_models, pick_models
from worker.settings import WorkerSettings

MODEL = "local-llama"
KEY = "sk-local-engine-0001"


# --- settings and model choice --------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:11434/v1", "http://localhost:8000/v1/", "http://[::1]:8080/v1", "https://gpu.lan:8443/v1"],
)
def test_loopback_http_and_any_https_are_accepted(url: str) -> None:
    s = WorkerSettings.from_args(["--engine-url", url, "--engine-key", KEY, "--kind", "volunteer"])
    assert (s.backend, s.kind, s.pool, s.slots) == ("engine", "volunteer", "own", 8)
    assert engine_base_url(url) == url.rstrip("/")
    assert KEY not in repr(s)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine-url", "http://192.168.1.20:11434/v1"], "plain http is allowed only on loopback"),
        (["--engine-url", "ftp://127.0.0.1/v1"], "must be an http(s) URL"),
        (["--engine-url", "http://user:pw@127.0.0.1:1/v1"], "must not hold credentials"),
        (["--engine-url", "http://127.0.0.1:1/v1", "--backend", "echo"], "cannot go with --backend echo"),
        (["--backend", "engine"], "needs --engine-url"),
    ],
)
def test_bad_engine_settings_are_refused(args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as e:
        WorkerSettings.from_args(args)
    assert message in str(e.value)


def test_models_served_are_the_engines_or_those_asked_for() -> None:
    listed = {"a": 4096, "b": 0}
    assert pick_models(listed, (), "u") == listed
    assert pick_models(listed, ("b",), "u") == {"b": 0}
    assert pick_models(None, ("x", "y"), "u") == {"x": 0, "y": 0}  # no /models: trust --models
    with pytest.raises(EngineError, match="does not serve c .it lists: a, b."):
        pick_models(listed, ("a", "c"), "u")
    with pytest.raises(EngineError, match="name them with --models"):
        pick_models(None, (), "u")
    with pytest.raises(EngineError, match="serves no model yet"):
        pick_models({}, (), "u")


async def test_the_model_list_comes_from_the_engine() -> None:
    async with FakeProvider(models=(MODEL, "other")) as fp:
        assert await list_models(fp.base_url, KEY) == {MODEL: 0, "other": 0}
        assert fp.requests[-1].key == KEY and fp.requests[-1].path == "/v1/models"
        assert await list_models(fp.base_url, "") is not None
        assert fp.requests[-1].key == NO_KEY  # engines without a key ignore the placeholder
        fp.behaviour = Behaviour(models_status=401)
        with pytest.raises(EngineError, match="refused the request .HTTP 401.: pass its key with --engine-key"):
            await list_models(fp.base_url, "")
        fp.behaviour = Behaviour(models_status=404)
        assert await list_models(fp.base_url, KEY) is None
        await fp.aset(Behaviour.down())
        started = time.monotonic()
        with pytest.raises(EngineError, match="does not answer"):
            await list_models(fp.base_url, KEY, wait=0.5)
        assert time.monotonic() - started < 5


# --- through the stack ----------------------------------------------------------------------


async def test_a_node_fronting_its_engine_serves_through_the_stack(stack: Stack) -> None:
    behaviour = Behaviour(chunks=("Hel", "lo from", " the", " engine"), prompt_tokens=11)
    async with FakeProvider(behaviour, models=(MODEL, "not-offered")) as fp:
        stack.start_worker(
            TOKENYARD_BACKEND="engine",
            TOKENYARD_ENGINE_URL=fp.base_url,
            TOKENYARD_ENGINE_KEY=KEY,
            TOKENYARD_MODELS=MODEL,
            TOKENYARD_NODE_ID="home-gpu",
            TOKENYARD_POOL="home",
        )
        await stack.start_api()
        await stack.wait_for_model(MODEL)
        adverts = await watch_adverts(stack)
        client = openai.AsyncOpenAI(base_url=f"{stack.api_url}/v1", api_key=ADMIN_KEY, max_retries=0, timeout=30)
        async with client:
            listed = {m.id: m.owned_by for m in (await client.models.list()).data}
            assert listed.get(MODEL) == "tokenyard" and "not-offered" not in listed

            plain = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0.2
            )
            assert plain.choices[0].message.content == "Hello from the engine"
            assert plain.choices[0].finish_reason == "stop"
            assert plain.usage is not None and (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (11, 4)

            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi again"}], stream=True
            )
            sse = await Sse().drain(stream)
            assert sse.text == "Hello from the engine" and sse.finish == "stop"

        chats = fp.chat_requests()
        assert len(chats) == 2 and {s.key for s in chats} == {KEY}
        assert [s.body["model"] for s in chats] == [MODEL, MODEL]
        assert all(s.body["stream"] is True for s in chats)  # always streamed from the engine, with usage
        assert chats[0].body["temperature"] == 0.2
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and adverts.latest.get("home-gpu", None) is None:
            await asyncio.sleep(0.05)
        advert = adverts.latest["home-gpu"]
        assert (advert.pool, advert.kind) == ("home", "own")  # the owner's capacity, not a provider pool
        assert [(m.id, m.input_price, m.output_price) for m in advert.models] == [(MODEL, 0.0, 0.0)]
        assert advert.hardware is not None and advert.hardware.cores > 0
        while time.monotonic() < deadline and adverts.latest["home-gpu"].served.requests < 2:
            await asyncio.sleep(0.05)
        served = adverts.latest["home-gpu"].served
        assert (served.requests, served.prompt_tokens, served.completion_tokens) == (2, 22, 8)


async def test_an_engine_that_wants_a_key_stops_the_worker_with_a_clear_message(stack: Stack) -> None:
    async with FakeProvider(Behaviour(models_status=401), models=(MODEL,)) as fp:
        worker = stack.start_worker(TOKENYARD_BACKEND="engine", TOKENYARD_ENGINE_URL=fp.base_url)
        deadline = time.monotonic() + 20
        while worker.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not worker.alive()
        assert worker.popen.returncode != 0
        output = worker.output()
        assert "refused the request (HTTP 401): pass its key with --engine-key" in output
        assert "Traceback" not in output


async def test_an_engine_without_the_model_asked_for_stops_the_worker(stack: Stack) -> None:
    async with FakeProvider(models=("llama3.2:latest",)) as fp:
        worker = stack.start_worker(TOKENYARD_BACKEND="engine", TOKENYARD_ENGINE_URL=fp.base_url, TOKENYARD_MODELS="x")
        deadline = time.monotonic() + 20
        while worker.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not worker.alive()
        assert "does not serve x (it lists: llama3.2:latest)" in worker.output()
