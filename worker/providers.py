"""The operator's provider config: upstream OpenAI-compatible APIs a cloud-adapter worker
forwards jobs to.

Only the operator writes this file; nothing a client sends can add a base URL or a header.
`parse_providers` is pure (the environment and secret files come in as arguments) and rejects
anything it does not know, naming the place: a typo must fail at start, not route traffic
wrongly. `load_providers` reads the YAML file and the secrets, and logs the warnings.

Keys are per provider (`worker.provider_keys`): a key that cannot be read fails only the
adapter of its provider, when it asks for it (`ProvidersConfig.get`). Every
`ProviderConfigError` from `load_providers` is one line naming the file, the field and the
fix, fit to print as it is (exit code 2).

    providers:
      - name: openai                       # the pool name: ^[a-z0-9][a-z0-9-]{0,62}$
        base_url: https://api.openai.com/v1  # https, or http for a loopback host only
        api_keys: [{env: OPENAI_KEY_1}, {file: /run/secrets/openai_2}]
        models: {gpt-4o-mini: gpt-4o-mini-2024-07-18}     # public id -> provider id
        prices: {"*": {input: 0.15, output: 0.60, cached: 0.075}}  # USD per 1M tokens
        timeouts: {connect: 5, first_token: 10, read: 60, total: 600}  # seconds
        max_retry_wait: 2                  # a 429's Retry-After up to this long is waited out here
        assistant_prefill: false           # continues a trailing assistant message (answers cut elsewhere go on here)
        max_concurrency: 64
        headers: {OpenAI-Organization: org-123}
        probe_interval: 30                 # seconds between GET {base_url}/models; 0 = off
        endpoints: [chat, completions, embeddings]  # what it serves (default: chat only)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
import yaml

from worker.config_shape import EXIT_CONFIG, ProviderConfigError, flag, mapping, number, only, whole
from worker.provider_keys import Secret, fingerprint, provider_keys

log = structlog.get_logger(__name__)

# The config's names, for the adapter, the worker's main and tests (some are defined beside it).
__all__ = [
    "EXIT_CONFIG",
    "ModelRoute",
    "Price",
    "Provider",
    "ProviderConfigError",
    "ProvidersConfig",
    "Secret",
    "Timeouts",
    "fingerprint",
    "is_loopback",
    "load_providers",
    "parse_providers",
]

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# Headers the adapter sets itself (or HTTP owns): an operator header must not override them.
RESERVED_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "host",
        "content-length",
        "content-type",
        "transfer-encoding",
        "connection",
        "cookie",
        "accept",
        "accept-encoding",
        "te",
        "upgrade",
    }
)
ANY_MODEL = "*"

_TOP_KEYS = ("providers",)
_PROVIDER_KEYS = (
    "name",
    "base_url",
    "api_keys",
    "models",
    "prices",
    "timeouts",
    "max_concurrency",
    "headers",
    "probe_interval",
    "endpoints",
    "max_retry_wait",
    "assistant_prefill",
)
# The upstream APIs a provider may serve, by the job task they carry (`schemas.tasks`), and
# their paths under its base URL.
ENDPOINTS = {"chat": "chat/completions", "completions": "completions", "embeddings": "embeddings"}
_PRICE_KEYS = ("input", "output", "cached")
_TIMEOUT_KEYS = ("connect", "first_token", "read", "total")
_MODEL_KEYS = ("id", "context_length", "first_token", "assistant_prefill")


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. `prompt_tokens` includes the cached ones (OpenAI's convention),
    so cached tokens are billed at `cached` and the rest of the prompt at `input`."""

    input: float
    output: float
    cached: float

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached = min(max(cached_tokens, 0), max(prompt_tokens, 0))
        uncached = max(prompt_tokens, 0) - cached
        completion = max(completion_tokens, 0)
        return (uncached * self.input + cached * self.cached + completion * self.output) / 1e6


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. `first_token` is how long a request may take to bring its first output (the
    headers and the first chunk with text): past it the attempt fails as retryable, so the
    gateway runs the job elsewhere instead of waiting out `read`. Ten seconds is several times
    what non-reasoning chat models take to their first token on the public providers (well under
    a second typically, a few seconds at worst under load or with long prompts), so a healthy
    provider is almost never cut off, while a hung one costs ten seconds, not the minute of
    `read`. Reasoning models (which think before their first text) and very long prompts take
    longer: give such a provider, or model, its own `first_token` (a model's wins)."""

    connect: float = 5.0  # TCP + TLS
    first_token: float = 10.0  # the request's start to its first output
    read: float = 60.0  # the longest silence: before the headers, and between two chunks
    total: float = 600.0  # one whole request


@dataclass(frozen=True, slots=True)
class ModelRoute:
    public: str
    upstream: str
    context_length: int = 0  # 0 = unknown
    first_token: float = 0.0  # seconds; 0 = the provider's `timeouts.first_token`
    assistant_prefill: bool | None = None  # None: the provider's `assistant_prefill`


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str  # without a trailing slash
    keys: tuple[Secret, ...]
    models: Mapping[str, ModelRoute]
    prices: Mapping[str, Price]
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_concurrency: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # may hold secrets
    probe_interval: float = 30.0
    key_error: str = ""  # why its keys could not be read (raised by `ProvidersConfig.get`)
    endpoints: frozenset[str] = frozenset({"chat"})  # of ENDPOINTS: what the upstream serves
    # A 429 whose Retry-After is at most this many seconds (and fits the first-token deadline)
    # is waited out on this provider rather than failing the attempt over; 0 = never wait.
    max_retry_wait: float = 2.0
    # The provider continues a trailing assistant message as the start of its answer (Anthropic's
    # and most self-hosted servers' chat templates do; OpenAI's API starts a new message after
    # it). Declared in the adverts: only such routes are given an answer cut elsewhere to
    # carry on. A model's own `assistant_prefill` wins.
    assistant_prefill: bool = False

    def prefill(self, public_model: str) -> bool:
        route = self.models.get(public_model)
        if route is not None and route.assistant_prefill is not None:
            return route.assistant_prefill
        return self.assistant_prefill

    def price(self, public_model: str) -> Price | None:
        return self.prices.get(public_model) or self.prices.get(ANY_MODEL)

    def first_token(self, public_model: str) -> float:
        route = self.models.get(public_model)
        return route.first_token if route is not None and route.first_token > 0 else self.timeouts.first_token


@dataclass(frozen=True, slots=True)
class ProvidersConfig:
    providers: tuple[Provider, ...]
    warnings: tuple[str, ...] = ()
    source: str = ""  # the file it came from, named in errors

    def get(self, name: str) -> Provider:
        """The provider an adapter forwards to, with its keys; raises if they cannot be read."""
        where = f"{self.source}: " if self.source else ""
        for p in self.providers:
            if p.name == name:
                if p.key_error:
                    raise ProviderConfigError(where + p.key_error)
                return p
        known = ", ".join(p.name for p in self.providers) or "none"
        raise ProviderConfigError(
            f"{where}no provider named {name!r} in the provider config (known: {known}); fix --provider"
        )


def load_providers(path: str | Path, *, env: Mapping[str, str] | None = None) -> ProvidersConfig:
    """Read and validate a provider config file; `{file: ...}` keys are relative to it."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ProviderConfigError(f"{path}: cannot read the provider config ({e.strerror}); fix --providers") from e
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ProviderConfigError(f"{path}: not valid YAML ({first})") from e

    def read_secret(name: str) -> str:
        return (path.parent / name).read_text(encoding="utf-8")

    try:
        config = parse_providers(data, env=os.environ if env is None else env, read_secret=read_secret)
    except ProviderConfigError as e:
        raise ProviderConfigError(f"{path}: {e}") from None
    for warning in config.warnings:
        log.warning("providers.config_warning", path=str(path), warning=warning)
    return dataclasses.replace(config, source=str(path))


def parse_providers(data: Any, *, env: Mapping[str, str], read_secret: Callable[[str], str]) -> ProvidersConfig:
    """Validate a decoded config. Pure: secrets come from `env` and `read_secret(path)`."""
    top = mapping(data, "the provider config")
    only(top, _TOP_KEYS, "the provider config")
    items = top.get("providers")
    if not isinstance(items, list) or not items:
        raise ProviderConfigError("the provider config needs 'providers': a non-empty list")
    warnings: list[str] = []
    providers = tuple(_provider(item, f"providers[{i}]", env, read_secret, warnings) for i, item in enumerate(items))
    names = [p.name for p in providers]
    for name in names:
        if names.count(name) > 1:
            raise ProviderConfigError(f"provider name {name!r} appears more than once")
    return ProvidersConfig(providers, tuple(warnings))


def _provider(
    item: Any, where: str, env: Mapping[str, str], read_secret: Callable[[str], str], warnings: list[str]
) -> Provider:
    d = mapping(item, where)
    only(d, _PROVIDER_KEYS, where)
    name = d.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ProviderConfigError(
            f"{where}.name: {name!r} is not a valid pool name (lower-case letters, digits and '-', "
            "starting with a letter or digit, at most 63 characters)"
        )
    where = f"provider {name!r}"
    models = _models(d.get("models"), f"{where}.models")
    prices = _prices(d.get("prices", {}), f"{where}.prices", models)
    unpriced = [m for m in models if m not in prices and ANY_MODEL not in prices]
    if unpriced:
        warnings.append(f"{where}: no price for {', '.join(unpriced)}; their cost is not reported")
    max_conc = d.get("max_concurrency")
    if max_conc is not None:
        max_conc = whole(max_conc, f"{where}.max_concurrency", minimum=1)
    probe = number(d.get("probe_interval", 30.0), f"{where}.probe_interval", minimum=0.0)
    retry_wait = number(d.get("max_retry_wait", 2.0), f"{where}.max_retry_wait", minimum=0.0)
    prefill = flag(d.get("assistant_prefill", False), f"{where}.assistant_prefill")
    keys, key_error = provider_keys(d.get("api_keys"), f"{where}.api_keys", env, read_secret, warnings)
    endpoints = d.get("endpoints", ["chat"])
    if not isinstance(endpoints, list) or not endpoints or any(e not in ENDPOINTS for e in endpoints):
        raise ProviderConfigError(
            f"{where}.endpoints: {endpoints!r} must be a non-empty list of {', '.join(ENDPOINTS)}"
        )
    return Provider(
        name=name,
        base_url=_base_url(d.get("base_url"), f"{where}.base_url"),
        keys=keys,
        key_error=key_error,
        models=models,
        prices=prices,
        timeouts=_timeouts(d.get("timeouts", {}), f"{where}.timeouts"),
        max_concurrency=max_conc,
        headers=_headers(d.get("headers", {}), f"{where}.headers"),
        probe_interval=probe,
        endpoints=frozenset(endpoints),
        max_retry_wait=retry_wait,
        assistant_prefill=prefill,
    )


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ProviderConfigError(f"{where}: required, e.g. https://api.example.com/v1")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as e:
        raise ProviderConfigError(f"{where}: {value!r} is not a valid URL ({e})") from e
    host = parts.hostname or ""
    if parts.scheme not in {"http", "https"} or not host:
        raise ProviderConfigError(f"{where}: {value!r} must be an http(s) URL with a host")
    if parts.scheme == "http" and not is_loopback(host):
        raise ProviderConfigError(
            f"{where}: plain http is allowed only for loopback hosts (127.0.0.0/8, localhost, ::1); "
            f"use https for {host!r}"
        )
    if parts.username is not None or parts.password is not None:
        raise ProviderConfigError(f"{where}: must not hold credentials; put keys in api_keys")
    if parts.query or parts.fragment:
        raise ProviderConfigError(f"{where}: must not hold a query or fragment")
    return value.rstrip("/")


def _models(value: Any, where: str) -> dict[str, ModelRoute]:
    d = mapping(value, where)
    if not d:
        raise ProviderConfigError(f"{where}: map at least one public model id to a provider model id")
    routes: dict[str, ModelRoute] = {}
    for public, target in d.items():
        here = f"{where}[{public!r}]"
        if not isinstance(public, str) or not public.strip() or len(public) > 256 or public == ANY_MODEL:
            raise ProviderConfigError(f"{where}: {public!r} is not a valid public model id")
        context, first_token, prefill = 0, 0.0, None
        if isinstance(target, Mapping):
            only(target, _MODEL_KEYS, here)
            context = whole(target.get("context_length", 0), f"{here}.context_length", minimum=0)
            first_token = number(target.get("first_token", 0.0), f"{here}.first_token", minimum=0.0)
            if "assistant_prefill" in target:
                prefill = flag(target["assistant_prefill"], f"{here}.assistant_prefill")
            target = target.get("id")
        if not isinstance(target, str) or not target.strip():
            raise ProviderConfigError(f"{here}: the provider model id must be a non-empty string")
        routes[public] = ModelRoute(public, target, context, first_token, prefill)
    return routes


def _prices(value: Any, where: str, models: Mapping[str, ModelRoute]) -> dict[str, Price]:
    d = mapping(value, where)
    prices: dict[str, Price] = {}
    for model, spec in d.items():
        here = f"{where}[{model!r}]"
        if model != ANY_MODEL and model not in models:
            raise ProviderConfigError(f"{here}: not a public model id of this provider (nor '*')")
        s = mapping(spec, here)
        only(s, _PRICE_KEYS, here)
        if "input" not in s or "output" not in s:
            raise ProviderConfigError(f"{here}: needs 'input' and 'output' (USD per million tokens)")
        inp = number(s["input"], f"{here}.input", minimum=0.0)
        # Without a cached price, cached tokens cost as much as any other prompt token.
        cached = number(s.get("cached", inp), f"{here}.cached", minimum=0.0)
        prices[model] = Price(inp, number(s["output"], f"{here}.output", minimum=0.0), cached)
    return prices


def _timeouts(value: Any, where: str) -> Timeouts:
    d = mapping(value, where)
    only(d, _TIMEOUT_KEYS, where)
    default = Timeouts()
    t = Timeouts(*(number(d.get(k, getattr(default, k)), f"{where}.{k}", minimum=0.001) for k in _TIMEOUT_KEYS))
    if "first_token" not in d:  # the default never outlasts a shorter total
        t = dataclasses.replace(t, first_token=min(t.first_token, t.total))
    if t.connect > t.total or t.read > t.total or t.first_token > t.total:
        raise ProviderConfigError(f"{where}: connect, first_token and read must not exceed total")
    return t


def _headers(value: Any, where: str) -> dict[str, str]:
    d = mapping(value, where)
    headers: dict[str, str] = {}
    for name, v in d.items():
        if not isinstance(name, str) or not _HEADER_NAME_RE.match(name):
            raise ProviderConfigError(f"{where}: {name!r} is not a valid header name")
        if name.lower() in RESERVED_HEADERS:
            raise ProviderConfigError(f"{where}: {name!r} is set by the adapter and cannot be configured")
        if not isinstance(v, (str, int, float)) or isinstance(v, bool):
            raise ProviderConfigError(f"{where}.{name}: the value must be a string")
        text = str(v)
        if any(ord(c) < 32 and c != "\t" for c in text):
            raise ProviderConfigError(f"{where}.{name}: the value holds control characters")
        headers[name] = text
    return headers
