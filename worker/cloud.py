"""The cloud-adapter backend: forwards a job to an upstream OpenAI-compatible provider.

Every request goes upstream with `stream: true` and `include_usage`, so text is relayed as it
comes and the final `Usage` carries upstream's exact counts and the price table's cost. Only
the operator's config (`worker.providers`) decides the URL and the headers: the client's body
is forwarded with its model id mapped, nothing else of the client's reaches the wire.

What comes back is relayed structured and exactly (parsed by `worker.cloud_answer`): each
streamed `delta.tool_calls` entry is one `ToolCallDelta` in the order upstream sent it, never
merged or reordered, so the arguments a client concatenates are upstream's byte for byte;
`logprobs` become `TokenLogprob`s. A job's task (`schemas.tasks`) picks the upstream API: chat
goes to `/chat/completions`, a raw-prompt completion to `/completions` and embeddings to
`/embeddings` (asked as base64, relayed as float32 vectors), each only where the provider's
`endpoints` list it.

Upstream answers, translated in one place (`_send` with `_status_error` and `_transport_error`;
upstream messages passed on are scrubbed of any configured key):

    2xx                      relayed
    429                      that key cools down (Retry-After or a backoff), the next key is tried;
                             none left: waited out here if the soonest key is back within
                             `max_retry_wait` and the first-token deadline, else
                             NoCapacityError (503, retry_after)
    401, 403                 that key is revoked (an alert is logged), the next key is tried
    402                      that key cools down for the longest cooldown (credit exhausted)
    400, 413, 422            InvalidRequestError with upstream's message (the client's fault)
    5xx, a reset or refused
    connection               retried once on this provider after 100-200 ms (a transient error
                             should not cost a failover), then WorkerFailedError (502)
    nothing within the
    first-token deadline     WorkerFailedError (502, upstream_first_token_timeout), long before
                             the read timeout: the gateway runs the job elsewhere
    other timeouts,
    malformed bodies         WorkerFailedError (502): the gateway fails over to another pool

Each of these is before the first output, so the attempt fails as retryable and the gateway
re-dispatches it, avoiding this pool. After the first output the stream ends with an error.

Health is scoped to (provider, model) (`worker.keyring.ModelHealth`): a model is taken out after
two first-token timeouts in a row or a high error rate, advertised unhealthy (so schedulers
place none of its jobs here, while the provider's other models keep serving), refuses jobs
already on their way with a retryable 503, and is tried again after a cooldown. The provider
as a whole: a periodic `GET {base_url}/models` probe, more often while it fails, and its keys
(`healthy()`, `health()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import structlog

from schemas.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    NoCapacityError,
    RequestTooLargeError,
    TokenyardError,
    UnsupportedError,
    WorkerFailedError,
)
from schemas.jobs import ModelAdvert
from schemas.rules import estimate_request_prompt
from schemas.tasks import TASK_KEY, Task, choices, task_of
from worker.backend import Output, Usage
from worker.cloud_answer import (
    EVENT_LIMIT,
    SseDecoder,
    StreamState,
    embedding_outputs,
    malformed,
    parse_json,
    upstream_error,
)
from worker.keyring import Clock, HealthPolicy, Keyring, ProviderHealth
from worker.providers import (
    ENDPOINTS,
    ModelRoute,
    Provider,
    ProviderConfigError,
    ProvidersConfig,
    load_providers,
)
from worker.settings import WorkerSettings
from worker.upstream_http import AiohttpTransport

log = structlog.get_logger(__name__)
T = TypeVar("T")

ERROR_BODY_LIMIT = 64 * 1024  # bytes of an upstream error body we read
EMBEDDINGS_LIMIT = 64 * 1024 * 1024  # bytes of an embeddings answer (2048 large vectors as base64 fit)
PROBE_TIMEOUT = 10.0  # seconds a health probe may take at most
RECOVERY_PROBE = 5.0  # seconds between probes while the provider fails them
TRANSIENT_RETRIES = 1  # retries on this provider of a 5xx or a lost connection before the first output
TRANSIENT_DELAY = (0.1, 0.2)  # seconds before such a retry (uniformly in this range)
RATE_WAITS = 3  # 429s of every key waited out on this provider, at most, per request
DRAIN_SECONDS = 0.25  # how long to wait for the end of a body after its last event
FIRST_TOKEN_TIMEOUT = "upstream_first_token_timeout"
_CLIENT_ERRORS = frozenset({400, 413, 422})
_KEY_REJECTED = frozenset({401, 403})


class CloudBackend:
    """See the module docstring. Build with `from_settings`, `from_config` or a `Provider`."""

    def __init__(
        self,
        provider: Provider,
        *,
        slots: int = 32,
        clock: Clock = time.monotonic,
        base_cooldown: float = 1.0,
        max_cooldown: float = 300.0,
        health_policy: HealthPolicy | None = None,
    ) -> None:
        health_policy = health_policy or HealthPolicy()
        self._provider = provider
        self._slots = max(1, min(slots, provider.max_concurrency or slots))
        self._keys = Keyring(
            [k.fingerprint for k in provider.keys],
            clock=clock,
            base_cooldown=base_cooldown,
            max_cooldown=max_cooldown,
            window=health_policy.window,
        )
        self._health = ProviderHealth(clock=clock, policy=health_policy)
        self._client: httpx.AsyncClient | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._in_flight = 0

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> CloudBackend:
        if not settings.providers or not settings.provider:
            raise ProviderConfigError("the cloud backend needs --providers FILE and --provider NAME")
        return cls.from_config(load_providers(settings.providers), settings.provider, slots=settings.slots)

    @classmethod
    def from_config(cls, config: ProvidersConfig, name: str, *, slots: int = 32, **options: Any) -> CloudBackend:
        return cls(config.get(name), slots=slots, **options)

    @property
    def _log(self) -> Any:
        return log.bind(provider=self._provider.name)

    @property
    def provider(self) -> Provider:
        return self._provider

    @property
    def slots(self) -> int:
        return self._slots

    def models(self) -> list[ModelAdvert]:
        adverts = []
        for r in self._provider.models.values():
            price = self._provider.price(r.public)
            adverts.append(
                ModelAdvert(
                    r.public,
                    r.context_length,
                    self._provider.name,
                    price.input if price else 0.0,
                    price.output if price else 0.0,
                    healthy=self._health.model(r.public).healthy(),
                    assistant_prefill=self._provider.prefill(r.public),
                )
            )
        return adverts

    async def start(self) -> None:
        p = self._provider
        t = p.timeouts
        self._client = httpx.AsyncClient(
            base_url=p.base_url + "/",
            headers=dict(p.headers),
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.read, pool=t.total),
            transport=AiohttpTransport(connections=self._slots + 1),  # not httpx's pool: see worker/upstream_http.py
            follow_redirects=False,  # a redirect could lead anywhere: the config names the host
            trust_env=False,  # no proxy or .netrc credentials picked up from the environment
        )
        if p.probe_interval > 0:
            self._probe_task = asyncio.create_task(self._probe_loop(), name=f"probe-{p.name}")

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def check(self, model: str, request: dict[str, Any]) -> None:
        self._route(model)
        if not self._health.model(model).healthy():  # a job placed before the advert said so
            raise NoCapacityError(
                f"Provider '{self._provider.name}' is failing for '{model}' right now.",
                code="upstream_unhealthy",
                retry_after=1.0,
            )
        # Everything else goes upstream as is (tools, tool_choice, response_format, logprobs...):
        # the upstream judges it. Only an API the provider does not serve is refused here.
        endpoint = _ENDPOINT_OF[task_of(request)]
        if endpoint not in self._provider.endpoints:
            raise UnsupportedError(
                f"Provider '{self._provider.name}' does not serve /{ENDPOINTS[endpoint]}.",
                param="model",
                code="unsupported_value",
            )

    def healthy(self) -> bool:
        return self._keys.ready_in() == 0 and self._health.healthy()

    def health(self) -> dict[str, Any]:
        return {
            "provider": self._provider.name,
            "healthy": self.healthy(),
            "in_flight": self._in_flight,
            **self._health.snapshot(),
            "models": {m: self._health.model(m).snapshot() for m in self._provider.models},
            "keys": self._keys.snapshot(),
        }

    async def generate(self, model: str, request: dict[str, Any]) -> AsyncIterator[Output]:
        route = self._route(model)
        deadline = time.monotonic() + self._provider.timeouts.total
        budget = _Budget(time.monotonic() + self._provider.first_token(model))
        self._in_flight += 1
        task = task_of(request)
        try:
            body = upstream_body(request, route.upstream)
            key, response, relay, first = await self._open(body, request, model, deadline, budget, task)
            try:
                async with contextlib.aclosing(relay):
                    yield self._priced(model, first) if isinstance(first, Usage) else first
                    async for item in relay:
                        yield self._priced(model, item) if isinstance(item, Usage) else item
            except TokenyardError as e:
                self._keys.failed(key)
                self._failed(model, e)
                raise
            finally:
                await response.aclose()  # mid-stream (cancelled): closes the upstream connection
            self._keys.succeeded(key)
            self._health.model(model).record(True)
        except TokenyardError as e:
            clean = self._scrubbed(e)
            if clean is e:
                raise
            raise clean from None
        finally:
            self._in_flight -= 1

    async def _open(
        self, body: dict[str, Any], request: dict[str, Any], model: str, deadline: float, budget: _Budget, task: Task
    ) -> tuple[int, httpx.Response, AsyncGenerator[Output, None], Output]:
        """Send, and read up to the first output, within the first-token deadline: the key, the
        answer, its relay and the relay's first item. A connection lost before that is tried once
        more here, like a 5xx (`_send`)."""
        while True:
            path = ENDPOINTS[_ENDPOINT_OF[task]]
            key, response = await self._before_first(budget.first_by, self._send(body, model, budget, path), model)
            relay = (
                _embeddings(response, request, self._provider.name)
                if task == "embedding"
                else _relay(response, request, deadline, self._provider.name)
            )
            opened = False
            try:
                first = await self._before_first(budget.first_by, anext(relay), model)
                opened = True
                return key, response, relay, first
            except TokenyardError as e:
                self._keys.failed(key)
                if e.code != FIRST_TOKEN_TIMEOUT:  # that one `_before_first` counted already
                    self._failed(model, e)
                delay = random.uniform(*TRANSIENT_DELAY)
                lost = isinstance(e.__cause__, httpx.TransportError) and not isinstance(
                    e.__cause__, httpx.TimeoutException
                )  # a reset, not a malformed or a silent answer
                if not lost or not budget.transient(delay):
                    raise
                self._log.info("cloud.retry", model=model, code=e.code, delay=round(delay, 3))
            finally:
                if not opened:  # failed or cancelled before the first output
                    await relay.aclose()
                    await response.aclose()
            await asyncio.sleep(delay)

    async def _before_first(self, first_by: float, step: Awaitable[T], model: str) -> T:
        """`step` (sending the request, or reading up to the first output) within the first-token
        deadline; past it, a retryable error that counts as a timeout of this model."""
        try:
            async with asyncio.timeout(max(first_by - time.monotonic(), 0.0)):
                return await step
        except TimeoutError:
            error = WorkerFailedError(
                f"Provider '{self._provider.name}' sent nothing within its first-token deadline "
                f"({self._provider.first_token(model):g} s).",
                code=FIRST_TOKEN_TIMEOUT,
            )
        except StopAsyncIteration:
            error = malformed("the answer ended before any output")
        self._failed(model, error)
        raise error

    def partial_usage(self, model: str, request: dict[str, Any], completion_tokens: int) -> Usage:
        """A stream cut short (the client left): upstream still bills the prompt it got and what
        it generated, but reports neither, so this is the best known: the prompt estimated as
        when upstream sends no usage, and the text chunks relayed, at this provider's prices."""
        return self._priced(model, Usage(estimate_request_prompt(request), completion_tokens))

    async def probe(self) -> bool:
        """One `GET {base_url}/models`: the provider answers (below 500) within the timeouts."""
        client = self._need_client()
        key = self._keys.peek()
        headers = {} if key is None else {"Authorization": f"Bearer {self._provider.keys[key].reveal()}"}
        t = self._provider.timeouts
        started = time.monotonic()
        status: int | None = None
        retry_after: float | None = None
        try:
            async with client.stream(
                "GET", "models", headers=headers, timeout=min(t.connect + t.read, PROBE_TIMEOUT)
            ) as response:
                status = response.status_code  # the body is never read: the status is enough
                retry_after = retry_after_seconds(response.headers)
        except httpx.HTTPError as e:
            self._log.warning("cloud.probe_failed", error=type(e).__name__)
        if key is not None and status is not None:
            self._key_status(key, status, retry_after)
        ok = status is not None and status < 500
        if status is not None and not ok:
            self._log.warning("cloud.probe_failed", status=status)
        self._health.probed(ok, time.monotonic() - started)
        return ok

    async def _probe_loop(self) -> None:
        while True:  # until close() cancels it
            try:
                await self.probe()
            except Exception:  # noqa: BLE001 - the top of a loop: logged, and the loop goes on
                self._log.exception("cloud.probe_crashed")
            interval = self._provider.probe_interval
            # a provider that failed its probe is looked at more often, so it is back soon after it is
            await asyncio.sleep(interval if self._health.healthy() else min(interval, RECOVERY_PROBE))

    async def _send(self, body: dict[str, Any], model: str, budget: _Budget, path: str) -> tuple[int, httpx.Response]:
        """`_send_once`, again on this provider where that beats a failover: once after a 5xx or
        a lost connection (100-200 ms later), and after a 429 of every key when the soonest key
        is back within `max_retry_wait` (up to RATE_WAITS times). Never past the first-token
        deadline."""
        while True:
            try:
                return await self._send_once(body, model, path)
            except _Again as again:
                if again.rate_limited:
                    ok = again.delay <= self._provider.max_retry_wait and budget.rate_wait(again.delay)
                else:
                    ok = budget.transient(again.delay)
                if not ok:
                    raise again.error from None
                self._log.info("cloud.retry", model=model, code=again.error.code, delay=round(again.delay, 3))
                await asyncio.sleep(again.delay)

    async def _send_once(self, body: dict[str, Any], model: str, path: str) -> tuple[int, httpx.Response]:
        """POST with the next usable key; rotate on 429 / 401 / 403 (each key once at most).
        Raises `_Again` for what another try here may fix, a TokenyardError for the rest."""
        client = self._need_client()
        tried: set[int] = set()
        for _ in range(len(self._keys)):
            key = self._keys.pick(exclude=frozenset(tried))
            if key is None:
                break
            tried.add(key)
            auth = {"Authorization": f"Bearer {self._provider.keys[key].reveal()}"}
            try:
                response = await client.send(client.build_request("POST", path, json=body, headers=auth), stream=True)
            except httpx.HTTPError as e:
                self._keys.failed(key)
                lost = _transport_error(e, self._provider.name)
                self._failed(model, lost)
                if isinstance(e, httpx.TimeoutException):
                    raise lost from e  # a hung provider: waiting on it again would double the cost
                raise _Again(lost, random.uniform(*TRANSIENT_DELAY)) from e
            if response.status_code < 300:
                return key, response
            try:
                detail = await _read_limited(response.aiter_bytes())
            except httpx.HTTPError:
                detail = b""
            finally:
                await response.aclose()
            if self._key_status(key, response.status_code, retry_after_seconds(response.headers)):
                continue
            refused = _status_error(response.status_code, detail, self._provider.name)
            if refused.status < 500:
                self._health.model(model).record(True)  # upstream works; the request was bad
                raise refused
            self._keys.failed(key)
            self._failed(model, refused)
            if response.status_code >= 500:  # a 404 or a 3xx would only come again
                raise _Again(refused, random.uniform(*TRANSIENT_DELAY))
            raise refused
        wait = self._keys.ready_in()
        if wait is None:
            revoked = WorkerFailedError(
                f"Provider '{self._provider.name}' has no usable API key.", code="upstream_keys_revoked"
            )
            self._failed(model, revoked)
            raise revoked
        # Every key rests: the provider's state, not this model's fault (the node advertises
        # itself unhealthy while no key is ready, `healthy()`).
        self._log.warning("cloud.rate_limited", model=model, ready_in=round(wait, 3))
        limited = NoCapacityError(
            f"Provider '{self._provider.name}' is rate-limiting every key.",
            code="upstream_rate_limited",
            retry_after=round(max(wait, 0.1), 3),
        )
        raise _Again(limited, wait, rate_limited=True)

    def _key_status(self, key: int, status: int, retry_after: float | None) -> bool:
        """Apply what an answer's status says about the key; True if another key may do better."""
        fp = self._keys.fingerprint(key)
        if status == 429:
            delay = self._keys.cool(key, retry_after)
            self._log.warning("cloud.key_cooled", key=fp, cooldown=round(delay, 3))
            return True
        if status == 402:
            delay = self._keys.cool(key, float("inf"))
            self._log.error("cloud.key_exhausted", key=fp, status=status, cooldown=round(delay, 3), alert=True)
            return True
        if status in _KEY_REJECTED:
            self._keys.revoke(key)
            self._log.error("cloud.key_revoked", key=fp, status=status, alert=True)
            return True
        return False

    def _failed(self, model: str, error: TokenyardError) -> None:
        health = self._health.model(model)
        was = health.healthy()
        health.record(False, timeout=error.code == FIRST_TOKEN_TIMEOUT)
        self._log.warning("cloud.upstream_failed", model=model, code=error.code, error=error.message)
        if was and not health.healthy():
            self._log.warning("cloud.model_unhealthy", model=model, **health.snapshot())

    def _scrubbed(self, error: TokenyardError) -> TokenyardError:
        """The error, or a copy without any API key in its message: upstream messages are passed
        on, and some providers quote the key they were sent."""
        message = error.message
        for secret in self._provider.keys:
            message = message.replace(secret.reveal(), "[redacted]")
        if message == error.message:
            return error
        return type(error)(message, param=error.param, code=error.code, retry_after=error.retry_after)

    def _priced(self, model: str, usage: Usage) -> Usage:
        price = self._provider.price(model)
        cost = None if price is None else price.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
        return Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, cost)

    def _route(self, model: str) -> ModelRoute:
        route = self._provider.models.get(model)
        if route is None:
            raise ModelNotFoundError(
                f"The model '{model}' is not served by provider '{self._provider.name}'.", param="model"
            )
        return route

    def _need_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("CloudBackend.start() has not been called")
        return self._client


_ENDPOINT_OF: dict[Task, str] = {"chat": "chat", "completion": "completions", "embedding": "embeddings"}


@dataclass(slots=True)
class _Budget:
    """What one request may still spend on tries on this provider before its first output."""

    first_by: float  # monotonic: the first-token deadline
    transients: int = TRANSIENT_RETRIES
    waits: int = RATE_WAITS

    def _fits(self, delay: float) -> bool:
        return time.monotonic() + delay < self.first_by

    def transient(self, delay: float) -> bool:
        """May a transient failure be tried again after `delay`? (Spends a try if so.)"""
        ok = self.transients > 0 and self._fits(delay)
        self.transients -= ok
        return ok

    def rate_wait(self, delay: float) -> bool:
        ok = self.waits > 0 and self._fits(delay)
        self.waits -= ok
        return ok


class _Again(Exception):
    """What `_send_once` could not do, and a retry on this provider might: `error` is what the
    attempt fails with if it does not get one, `delay` how long to wait before it."""

    def __init__(self, error: TokenyardError, delay: float, *, rate_limited: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.delay = delay
        self.rate_limited = rate_limited


def upstream_body(request: dict[str, Any], upstream_model: str) -> dict[str, Any]:
    """The client's body for upstream: its model mapped, always streamed with usage (embeddings
    are one JSON answer, asked as base64: a quarter of the bytes of JSON floats, and exact)."""
    task = task_of(request)
    body = {k: v for k, v in request.items() if k not in {"model", "stream", "stream_options", TASK_KEY}}
    body["model"] = upstream_model
    if task == "embedding":
        body["encoding_format"] = "base64"
        return body
    if task == "completion":
        # The job asks logprobs as chat does (a flag and how many alternatives); legacy
        # completions take the number of alternatives as `logprobs` itself.
        top = body.pop("top_logprobs", None)
        if body.pop("logprobs", False):
            body["logprobs"] = int(top or 0)
        if "max_completion_tokens" in body:
            body["max_tokens"] = body.pop("max_completion_tokens")
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return body


def retry_after_seconds(headers: httpx.Headers, now: float | None = None) -> float | None:
    """`retry-after-ms`, else `Retry-After` as seconds or an HTTP date; None if absent or bad."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            return max(float(ms) / 1000.0, 0.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def _status_error(status: int, detail: bytes, provider: str) -> TokenyardError:
    """A non-2xx answer that is not about the key."""
    message, param, code = upstream_error(detail)
    if status in _CLIENT_ERRORS:
        text = message or f"The upstream provider rejected the request (HTTP {status})."
        if code == "context_length_exceeded":
            return ContextLengthError(text, param=param or "messages")
        if status == 413:
            return RequestTooLargeError(text)
        return InvalidRequestError(text, param=param, code=code)
    return WorkerFailedError(f"Provider '{provider}' answered HTTP {status}.", code="upstream_error")


def _transport_error(e: httpx.HTTPError, provider: str) -> WorkerFailedError:
    if isinstance(e, httpx.TimeoutException):
        return WorkerFailedError(f"Provider '{provider}' timed out ({type(e).__name__}).", code="upstream_timeout")
    if isinstance(e, httpx.ConnectError):
        return WorkerFailedError(f"Provider '{provider}' is unreachable.", code="upstream_unreachable")
    return WorkerFailedError(
        f"The connection to provider '{provider}' failed ({type(e).__name__}).", code="upstream_disconnected"
    )


async def _read_limited(chunks: AsyncIterator[bytes], limit: int = ERROR_BODY_LIMIT) -> bytes:
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit])


async def _relay(
    response: httpx.Response, request: dict[str, Any], deadline: float, provider: str
) -> AsyncGenerator[Output, None]:
    """Upstream's answer as outputs (Usage unpriced). Translates transport errors."""
    state = StreamState(choices(request))
    chunks = response.aiter_bytes()
    try:
        if response.headers.get("content-type", "").startswith("application/json"):
            # An upstream that ignored `stream: true`: one whole completion.
            for item in state.completion(parse_json(await _read_limited(chunks, EVENT_LIMIT))):
                yield item
        else:
            decoder = SseDecoder()
            async for raw in chunks:
                for data in decoder.feed(raw):
                    for item in state.event(data):
                        yield item
                if state.done:
                    break
                if time.monotonic() > deadline:
                    raise WorkerFailedError(
                        "The upstream answer took longer than the provider's total timeout.", code="upstream_timeout"
                    )
        await _drain(chunks)
    except httpx.HTTPError as e:
        raise _transport_error(e, provider) from e
    for item in state.end(request):
        yield item


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read the little that follows `[DONE]` (the body's closing chunk), so the connection goes
    back to the pool instead of being closed; give up quickly on an upstream that lingers."""
    size = 0
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(DRAIN_SECONDS):
            async for raw in chunks:
                size += len(raw)
                if size > ERROR_BODY_LIMIT:
                    return


async def _embeddings(response: httpx.Response, request: dict[str, Any], provider: str) -> AsyncGenerator[Output, None]:
    """An `/embeddings` answer as one float32 vector per input, then the Usage (unpriced)."""
    try:
        data = await _read_limited(response.aiter_bytes(), EMBEDDINGS_LIMIT + 1)
    except httpx.HTTPError as e:
        raise _transport_error(e, provider) from e
    if len(data) > EMBEDDINGS_LIMIT:
        raise malformed("the embeddings answer is larger than the limit")
    for item in embedding_outputs(parse_json(data), request):
        yield item
