"""Generated bad input against a real stack (issue 11): over a thousand requests per run from
hypothesis, to every public and admin route, with random and adversarial JSON (deep nesting,
huge integers, lone surrogates, wrong types, unknown fields, huge strings, duplicate keys),
bytes that are not UTF-8 or not JSON, wrong content types, empty bodies, random methods and
paths, and odd headers (huge, many, non-latin-1). Every answer must be below 500, every error
OpenAI's error object, every request must end within its client timeout, and afterwards the
gateway must still answer a good request correctly.

One stack for the whole module: nats-server, a scheduler, an echo worker (its fault
directives off, as in production) and the API as its own process, with its data under the
module's tmp dir. Examples are derandomized (the same requests every run) and hypothesis keeps
its example database under the tmp dir too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import ECHO
from tests.stack import ADMIN_KEY, Stack, auth_headers

REQUESTS_PER_RUN = 1000  # at least this many, over the tests below
CLIENT_TIMEOUT = 15.0  # seconds: a request that takes longer is a hang


@dataclass
class Target:
    url: str
    tenant_key: str  # an ordinary (non-admin) key of another org
    org_id: str
    key_id: str
    http: httpx.Client
    sent: int = 0
    by_status: dict[int, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp("fuzz")
    stack = Stack(tmp)
    stack.start_nats()
    stack.start_scheduler()
    stack.start_worker(TOKENYARD_ECHO_DIRECTIVES="0", TOKENYARD_ECHO_TOKENS="8")
    proc, url = asyncio.run(stack.spawn_api(TOKENYARD_DATA_DIR=str(tmp / "api-data"), TOKENYARD_LOG_LEVEL="error"))
    http = httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = http.get("/v1/models", headers=auth_headers())
            if r.status_code == 200 and ECHO in {m["id"] for m in r.json()["data"]}:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the stack did not come up:\n{proc.output()[-3000:]}")
        org = http.post("/v1/admin/orgs", json={"name": "fuzz-org"}, headers=auth_headers()).json()
        key = http.post("/v1/admin/keys", json={"name": "fuzz", "org": org["id"]}, headers=auth_headers()).json()
        yield Target(url, key["key"], org["id"], key["id"], http)
    finally:
        http.close()
        asyncio.run(stack.close())


def fuzz(examples: int) -> settings:
    """Derandomized (the same examples every run, so a failure reproduces), no deadline (a
    request's time is the stack's, not the strategy's), no example database (nothing written
    outside the tmp dir)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )


# --- checking every answer -------------------------------------------------------------------


def send(t: Target, method: str, path: str, *, content: bytes | None = None, headers: Any = None) -> httpx.Response:
    started = time.monotonic()
    try:
        r = t.http.request(method, path, content=content, headers=headers)
    except httpx.TimeoutException as e:
        raise AssertionError(f"no answer within {CLIENT_TIMEOUT} s: {method} {path!r}") from e
    t.sent += 1
    t.by_status[r.status_code] = t.by_status.get(r.status_code, 0) + 1
    took = time.monotonic() - started
    where = f"{method} {path!r} -> {r.status_code} in {took:.1f} s: {r.text[:500]!r}"
    assert took < CLIENT_TIMEOUT, where
    if r.status_code == 503 and path.split("?")[0] == "/readyz":
        assert r.json() == {"status": "not ready"}, where  # "not ready" is its answer, not an error
        return r
    assert r.status_code < 500, where
    if r.status_code >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), where
        if method != "HEAD":
            body = r.json()
            assert set(body) == {"error"}, where
            assert set(body["error"]) == {"message", "type", "param", "code"}, where
            assert isinstance(body["error"]["message"], str) and body["error"]["message"], where
    return r


# --- what is sent ----------------------------------------------------------------------------

BIG_INTS = st.sampled_from([2**63, 2**64, 2**64 + 1, -(2**63) - 1, 10**30, -(10**40)])
SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc00b", "\ud83d"])
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    BIG_INTS,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    SURROGATES,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.one_of(st.text(max_size=12), SURROGATES), inner, max_size=5)
    ),
    max_leaves=20,
)

ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "wizard", ""])
contents = st.one_of(
    st.text(max_size=80),
    SURROGATES,
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "input_audio", "x"])},
            optional={"text": st.one_of(st.text(max_size=30), json_values), "image_url": json_values},
        ),
        max_size=3,
    ),
    json_values,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.one_of(ROLES, json_values)},
        optional={
            "content": contents,
            "name": json_values,
            "tool_call_id": json_values,
            "tool_calls": json_values,
            "x-extra": json_values,
        },
    ),
    max_size=4,
)
CHAT_FIELDS = [
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "provider",
    "models",
    "metadata",
    "store",
    "service_tier",
    "reasoning_effort",
]
plain_messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=60)}),
    min_size=1,
    max_size=3,
)
chat_bodies = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries(
        {
            "model": st.one_of(st.just(ECHO), st.just(ECHO), st.text(max_size=30), json_values),
            "messages": st.one_of(plain_messages, plain_messages, messages, json_values),
        }
    ),
    st.dictionaries(
        st.one_of(st.sampled_from(CHAT_FIELDS), st.text(max_size=10)),
        st.one_of(
            json_values,
            st.integers(-5, 5000),
            st.floats(-3, 3),
            st.sampled_from([True, False, "auto", "none", "required", {"type": "json_object"}, ["\n", "stop"]]),
        ),
        max_size=6,
    ),
)
good_chat = st.builds(
    lambda text, tokens, stream: {
        "model": ECHO,
        "messages": [{"role": "user", "content": text or "ok"}],
        "max_tokens": tokens,
        "stream": stream,
    },
    st.text(max_size=40),
    st.integers(1, 8),
    st.booleans(),
)


def _dumps(value: Any) -> bytes:
    """JSON as a client would send it: lone surrogates escaped, NaN and Infinity as bare words."""
    return json.dumps(value, ensure_ascii=True).encode()


def _raw_variants(body: Any) -> st.SearchStrategy[bytes]:
    text = _dumps(body)
    return st.sampled_from(
        [
            text,
            text[: max(1, len(text) // 2)],  # truncated
            b"\xef\xbb\xbf" + text,  # a BOM
            text.replace(b'"', b"'", 2),
            text + b"garbage",
            b"",
            b"null",
            b"[]",
            b"\xff\xfe" + text.decode("ascii").encode("utf-16-le"),
            text.replace(b"{", b'{"model": 1, "model": ', 1) if text.startswith(b"{") else text,  # duplicate keys
            b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            b'{"s": "' + b"\\ud800" * 3 + b'"}',
            b'{"x": "\xc3\x28\xa0\xa1"}',  # invalid UTF-8 inside a string
            b'{"n": ' + b"9" * 400 + b"}",
            b'{"f": 1e99999, "g": -Infinity, "h": NaN}',
        ]
    )


CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=utf-16",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "",
        "application/json\u00e9".encode("utf-8").decode("latin-1"),
    ]
)


def _auth(t: Target, which: str) -> dict[str, str]:
    return {
        "admin": auth_headers(),
        "tenant": auth_headers(t.tenant_key),
        "wrong": {"Authorization": "Bearer ty_admin_not-the-key"},
        "basic": {"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"},
        "none": {},
        "huge": {"Authorization": "Bearer " + "k" * 20_000},
        "odd": {"Authorization": "Bearer ty_" + "_" * 10 + "\u00ff\u00e9"},
    }[which]


AUTHS = st.sampled_from(["admin", "admin", "admin", "tenant", "wrong", "basic", "none", "huge", "odd"])


def _with_type(headers: dict[str, str], content_type: str) -> dict[str, str]:
    return {**headers, "content-type": content_type} if content_type else headers


def _headers_bytes(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _sendable(value: bytes) -> bytes:
    """A header value any HTTP/1.1 client can put on the wire (no control bytes, no padding):
    what is left is for the server to cope with, including bytes past latin-1's printable set."""
    return bytes(c for c in value if c >= 0x20 and c != 0x7F).strip(b" \t")


# --- the tests -------------------------------------------------------------------------------


@fuzz(600)
@given(body=chat_bodies, auth=AUTHS, data=st.data())
def test_chat_completions(target: Target, body: dict[str, Any], auth: str, data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        raw = _dumps(body)
    else:
        raw = data.draw(_raw_variants(body))
    headers = _headers_bytes(_with_type(_auth(target, auth), data.draw(CONTENT_TYPES)))
    if data.draw(st.integers(0, 9)) == 0:
        headers.append((b"idempotency-key", _sendable(data.draw(st.text(min_size=1, max_size=300)).encode())))
    if data.draw(st.integers(0, 9)) == 0:
        headers.append((b"x-tokenyard-cache", data.draw(st.sampled_from([b"bypass", b"no", b"yes", b"\xff"]))))
    send(target, "POST", "/v1/chat/completions", content=raw, headers=headers)


@fuzz(40)
@given(body=good_chat, auth=st.sampled_from(["admin", "tenant"]))
def test_good_chat_requests_are_answered(target: Target, body: dict[str, Any], auth: str) -> None:
    """The fuzzing above must not have broken anything for well-formed requests."""
    r = send(target, "POST", "/v1/chat/completions", content=_dumps(body), headers=_auth(target, auth))
    assert r.status_code == 200, r.text
    if not body["stream"]:
        assert r.json()["choices"][0]["message"]["content"]
    else:
        assert r.text.rstrip().endswith("data: [DONE]")


ID = st.one_of(
    st.text(min_size=1, max_size=40).map(lambda s: quote(s, safe="")),  # any text, as a client must send it
    st.sampled_from(["..", "%2e%2e", "%00", "%ff%fe", "%ed%a0%80", "a" * 3000, "org_000000000000", "key_x"]),
)
ADMIN_ROUTES = [
    ("GET", "/v1/admin/orgs"),
    ("POST", "/v1/admin/orgs"),
    ("GET", "/v1/admin/orgs/{org}"),
    ("PATCH", "/v1/admin/orgs/{org}"),
    ("GET", "/v1/admin/keys"),
    ("POST", "/v1/admin/keys"),
    ("GET", "/v1/admin/keys/{key}"),
    ("DELETE", "/v1/admin/keys/{id}"),
    ("POST", "/v1/admin/keys/{id}/revoke"),
    ("GET", "/v1/admin/usage"),
    ("GET", "/v1/admin/usage/export"),
    ("GET", "/v1/admin/audit"),
    ("GET", "/v1/admin/routing"),
    ("PUT", "/v1/admin/routing/default"),
    ("DELETE", "/v1/admin/routing/default"),
    ("PUT", "/v1/admin/routing/keys/{id}"),
    ("DELETE", "/v1/admin/routing/keys/{id}"),
    ("PUT", "/v1/admin/routing/models/{id}"),
    ("DELETE", "/v1/admin/routing/models/{id}"),
]
ADMIN_BODY_FIELDS = [
    "name",
    "org",
    "project",
    "projects",
    "admin",
    "models",
    "limits",
    "priority",
    "expires_in",
    "cache",
    "volunteer_ok",
    "strategy",
    "order",
    "weights",
    "spill_wait",
]
LIMIT_FIELDS = ["rpm", "tpm", "max_concurrent", "tokens_per_day", "usd_per_day", "max_tokens", "max_body_bytes"]
admin_bodies = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(ADMIN_BODY_FIELDS), st.text(max_size=8)), json_values, max_size=6),
    st.fixed_dictionaries(
        {"name": st.one_of(st.text(max_size=30), SURROGATES)},
        optional={
            "limits": st.dictionaries(st.sampled_from(LIMIT_FIELDS), st.one_of(json_values, BIG_INTS), max_size=4),
            "projects": json_values,
        },
    ),
    json_values,
)
QUERY = st.dictionaries(
    st.sampled_from(["since", "until", "org", "group_by", "format", "limit", "x"]),
    st.one_of(st.text(max_size=20), st.sampled_from(["1e400", "nan", "-inf", "9" * 400, "csv", "json", "day"])),
    max_size=4,
)


@fuzz(400)
@given(route=st.sampled_from(ADMIN_ROUTES), body=admin_bodies, auth=AUTHS, data=st.data())
def test_admin_routes(target: Target, route: tuple[str, str], body: Any, auth: str, data: st.DataObject) -> None:
    method, template = route
    real = data.draw(st.booleans())
    path = template.format(
        org=target.org_id if real else data.draw(ID),
        key=target.key_id if real else data.draw(ID),
        id=data.draw(ID),
    )
    params = data.draw(QUERY)
    if params:
        path += "?" + str(httpx.QueryParams(params))
    raw = _dumps(body) if data.draw(st.booleans()) else data.draw(_raw_variants(body))
    headers = _headers_bytes(_with_type(_auth(target, auth), data.draw(CONTENT_TYPES)))
    send(target, method, path, content=raw if method in {"POST", "PUT", "PATCH"} else None, headers=headers)


PUBLIC_PATHS = [
    "/v1/chat/completions",
    "/v1/models",
    "/v1/models/" + ECHO,
    "/v1/models/{id}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/admin/orgs",
    "/v1/admin/keys/{id}/revoke",
    "/v1/admin/routing/models/{id}",
    "/",
    "/v1",
    "/v1/completions",
    "/v1/embeddings",
    "/docs",
    "/openapi.json",
]
METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "X"])
random_paths = st.one_of(
    st.sampled_from(PUBLIC_PATHS),
    st.text(max_size=60).map(lambda s: "/" + quote(s, safe="/")),
    st.lists(st.sampled_from(["v1", "admin", "..", ".", "models", "%2F", "%00", "chat", "completions", "~"])).map(
        lambda parts: "/" + "/".join(parts)
    ),
)


@fuzz(250)
@given(method=METHODS, path=random_paths, auth=AUTHS, data=st.data())
def test_random_methods_and_paths(target: Target, method: str, path: str, auth: str, data: st.DataObject) -> None:
    path = path.replace("{id}", data.draw(ID))
    body = data.draw(st.one_of(st.none(), json_values.map(_dumps), st.binary(max_size=200)))
    headers = _headers_bytes(_with_type(_auth(target, auth), data.draw(CONTENT_TYPES)))
    send(target, method, path, content=body, headers=headers)


header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=30)
header_values = st.one_of(
    st.text(max_size=100).map(lambda s: _sendable(s.encode("utf-8"))),  # non-latin-1 characters, as UTF-8
    st.binary(max_size=60).map(_sendable),
    st.integers(1_000, 80_000).map(lambda n: b"v" * n),  # huge: past the 64 KiB limit sometimes
    st.sampled_from([b"", b"\xff\xfe", "\u00e9\u4e2d".encode(), b"ty_admin_" + b"x" * 100]),
)
HEADER_TARGETS = [
    ("GET", "/healthz"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/admin/orgs"),
    ("GET", "/metrics"),
]


@fuzz(120)
@given(
    route=st.sampled_from(HEADER_TARGETS),
    extra=st.lists(st.tuples(header_names, header_values), max_size=8),
    many=st.integers(0, 400),
    special=st.dictionaries(
        st.sampled_from(["x-request-id", "idempotency-key", "x-tokenyard-cache", "authorization", "content-length"]),
        header_values,
        max_size=3,
    ),
)
def test_odd_headers(
    target: Target,
    route: tuple[str, str],
    extra: list[tuple[str, bytes]],
    many: int,
    special: dict[str, bytes],
) -> None:
    method, path = route
    headers = [(k.encode(), v) for k, v in auth_headers().items()]
    headers += [(f"x-many-{i}".encode(), b"v" * 20) for i in range(many)]
    # a Content-Length that is not a number httpx itself refuses to send (LocalProtocolError):
    # the server never sees it (the CI run found `content-length: ""` among the generated names)
    headers += [(k.encode(), v) for k, v in extra if k.lower() != "content-length" or v.isdigit()]
    headers += [(k.encode(), v) for k, v in special.items() if k != "content-length" or v.isdigit()]
    body = _dumps({"model": ECHO, "messages": [{"role": "user", "content": "h"}], "max_tokens": 1})
    try:
        send(target, method, path, content=body if method == "POST" else None, headers=headers)
    except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError) as e:
        # A head past the limit on a reused connection, or a Content-Length that contradicts the
        # body, may be answered by closing the connection: never by a 5xx or a hang.
        assert _head_size(headers) > 64 * 1024 or any(k == b"content-length" for k, _ in headers), e


def _head_size(headers: list[tuple[bytes, bytes]]) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers)


def test_the_gateway_still_answers_good_requests_after_the_run(target: Target) -> None:
    for stream in (False, True):
        body = {"model": ECHO, "messages": [{"role": "user", "content": "still fine"}], "max_tokens": 2}
        r = send(
            target, "POST", "/v1/chat/completions", content=_dumps({**body, "stream": stream}), headers=auth_headers()
        )
        assert r.status_code == 200, r.text
        if not stream:
            assert r.json()["choices"][0]["message"]["content"] == "still fine"
    assert send(target, "GET", "/v1/models", headers=auth_headers()).status_code == 200
    assert send(target, "GET", "/v1/admin/orgs", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200
    assert target.sent >= REQUESTS_PER_RUN, f"only {target.sent} requests were sent"
    print(f"fuzz: {target.sent} requests, by status {dict(sorted(target.by_status.items()))}")
