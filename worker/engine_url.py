"""Bring your own engine: a node that fronts an OpenAI-compatible server on its own machine
(Ollama, vLLM, SGLang, llama.cpp's server) instead of running the transformers engine.

`tokenyard worker --engine-url http://127.0.0.1:11434/v1` asks the engine's `GET /models` which
models it serves and advertises those, or those of `--models` (each must be among them). Jobs
go to the engine through the cloud adapter's machinery (`worker.cloud`): streamed with usage,
upstream errors translated the same way (a 400 is the client's, a failure before the first
token is re-dispatched), a health probe on `/models`. The URL is plain http only on loopback
(the engine's own port on this machine), else https, as for a cloud provider.

Unlike a cloud adapter this is the owner's own capacity, in its `--pool` and of its `--kind`
(own, or volunteer with idle-time mode): it has no price, its models are owned by "tokenyard"
as those of the transformers engine are, and it needs no providers file. `--engine-key` is the
bearer token for engines started with one (vLLM's and llama.cpp's `--api-key`); without it a
placeholder goes out, which engines without a key ignore.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from schemas.jobs import ModelAdvert
from worker.backend import Output, Usage
from worker.cloud import CloudBackend
from worker.providers import ModelRoute, Provider, Secret, Timeouts, is_loopback
from worker.settings import WorkerSettings

log = structlog.get_logger(__name__)

NAME = "local engine"  # how errors and logs name it ("Provider 'local engine' is unreachable.")
OWNER = "tokenyard"
NO_KEY = "tokenyard-no-key"
ENGINE_WAIT = 60.0  # seconds the worker waits for an engine that is not up yet (started alongside)
LIST_TIMEOUT = 10.0
# A local engine on modest hardware may take long over a long prompt: generous, but bounded.
TIMEOUTS = Timeouts(connect=5.0, read=300.0, total=3600.0)
PROBE_INTERVAL = 30.0


class EngineError(RuntimeError):
    """The engine cannot be fronted as asked; the message says why and what to do."""


def engine_base_url(url: str) -> str:
    """The engine's base URL without a trailing slash; ValueError when it is not allowed."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ValueError(f"--engine-url {url!r} is not a valid URL ({e})") from e
    host = parts.hostname or ""
    if parts.scheme not in {"http", "https"} or not host:
        raise ValueError(f"--engine-url {url!r} must be an http(s) URL, e.g. http://127.0.0.1:11434/v1")
    if parts.scheme == "http" and not is_loopback(host):
        raise ValueError(
            f"--engine-url {url!r}: plain http is allowed only on loopback (127.0.0.1, localhost, ::1); "
            f"use https for {host!r}"
        )
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise ValueError(f"--engine-url {url!r} must not hold credentials, a query or a fragment (see --engine-key)")
    return url.rstrip("/")


async def list_models(base_url: str, key: str, *, wait: float = ENGINE_WAIT) -> dict[str, int] | None:
    """The engine's models (id -> context length, 0 if it does not say), or None when it has no
    usable `/models`. Waits up to `wait` seconds for an engine that does not answer yet."""
    headers = {"Authorization": f"Bearer {key or NO_KEY}"}
    deadline = time.monotonic() + wait
    told = 0.0
    async with httpx.AsyncClient(timeout=LIST_TIMEOUT, follow_redirects=False, trust_env=False) as http:
        while True:
            try:
                response = await http.get(f"{base_url}/models", headers=headers)
                break
            except httpx.HTTPError as e:
                now = time.monotonic()
                if now >= deadline:
                    raise EngineError(f"the engine at {base_url} does not answer ({type(e).__name__})") from e
                if now - told >= 5.0:
                    told = now
                    log.info("engine.waiting", url=base_url, error=type(e).__name__)
                await asyncio.sleep(0.5)
    if response.status_code in (401, 403):
        hint = "check --engine-key" if key else "pass its key with --engine-key"
        raise EngineError(f"the engine at {base_url} refused the request (HTTP {response.status_code}): {hint}")
    if response.status_code != 200:
        log.warning("engine.no_model_list", url=base_url, status=response.status_code)
        return None
    try:
        data = response.json()["data"]
        return {str(m["id"]): _context_length(m) for m in data}
    except (ValueError, KeyError, TypeError):
        log.warning("engine.bad_model_list", url=base_url)
        return None


def _context_length(model: Mapping[str, Any]) -> int:
    """vLLM and SGLang say `max_model_len`; others say nothing (0: unknown)."""
    value = model.get("max_model_len")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def pick_models(listed: Mapping[str, int] | None, wanted: tuple[str, ...], base_url: str) -> dict[str, int]:
    """What the node serves: `wanted` (each must be listed, when the engine lists), else all."""
    if listed is None:
        if not wanted:
            raise EngineError(f"the engine at {base_url} lists no models (GET /models); name them with --models")
        return {m: 0 for m in wanted}
    if not wanted:
        if not listed:
            raise EngineError(f"the engine at {base_url} serves no model yet; load one, or name it with --models")
        return dict(listed)
    missing = [m for m in wanted if m not in listed]
    if missing:
        raise EngineError(
            f"the engine at {base_url} does not serve {', '.join(missing)} (it lists: {', '.join(listed) or 'none'})"
        )
    return {m: listed[m] for m in wanted}


class EngineBackend:
    """A `CloudBackend` for the local engine, advertised as the owner's capacity."""

    def __init__(self, cloud: CloudBackend) -> None:
        self._cloud = cloud

    @classmethod
    async def open(cls, settings: WorkerSettings) -> EngineBackend:
        base_url = engine_base_url(settings.engine_url)
        models = pick_models(await list_models(base_url, settings.engine_key), settings.models, base_url)
        provider = Provider(
            name=NAME,
            base_url=base_url,
            keys=(Secret(settings.engine_key or NO_KEY),),
            models={m: ModelRoute(m, m, context) for m, context in models.items()},
            prices={},  # own capacity: no price
            timeouts=TIMEOUTS,
            probe_interval=PROBE_INTERVAL,
        )
        log.info("engine.fronted", url=base_url, models=list(models))
        return cls(CloudBackend(provider, slots=settings.slots))

    @property
    def slots(self) -> int:
        return self._cloud.slots

    def models(self) -> list[ModelAdvert]:
        return [dataclasses.replace(m, owned_by=OWNER) for m in self._cloud.models()]

    async def start(self) -> None:
        await self._cloud.start()

    async def close(self) -> None:
        await self._cloud.close()

    def check(self, model: str, request: dict[str, Any]) -> None:
        self._cloud.check(model, request)

    def generate(self, model: str, request: dict[str, Any]) -> AsyncIterator[Output]:
        return self._cloud.generate(model, request)

    def healthy(self) -> bool:
        return self._cloud.healthy()

    def partial_usage(self, model: str, request: dict[str, Any], completion_tokens: int) -> Usage:
        return self._cloud.partial_usage(model, request, completion_tokens)
