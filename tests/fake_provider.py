"""A real fake OpenAI-compatible provider for tests: uvicorn on 127.0.0.1, a free port, its own
thread and event loop, so it serves whatever the test's own loop is doing.

    async with FakeProvider() as fp:                      # or: with FakeProvider() as fp:
        fp.base_url                                       # http://127.0.0.1:PORT/v1
        fp.behaviour = Behaviour.status(503)              # change it at any time
        await fp.aset(Behaviour.down())                   # "down" (connection refused) stops the
                                                          # listener; `aset` does it off the loop
        fp.chat_keys()                                    # the API keys it was called with

Behaviours: normal answers (streamed or whole, `n` choices, usage when asked), `down`
(connection refused: the port stays reserved by a socket that does not listen), `slow`
(headers after `delay`), `status` (an HTTP error with an OpenAI error body and Retry-After),
`garbage` (200 with a body that is not SSE JSON), `disconnect` (the connection drops after
`disconnect_after` content chunks), `stall` (after that many chunks nothing more comes, the
connection stays open), `malformed` (after that many chunks, a chunk that is not JSON). With
`prefill`, a trailing assistant message is continued as real providers that support assistant
prefill do: the answer leaves out the chunks that message already holds. Per key:
`rate_limited_keys` get 429, `rejected_keys` 401 (whose message quotes the key, as real
providers partly do, to catch leaks). It records every
request (`requests`) and whether its client went away mid-answer (`disconnects`).

The OpenAI surface beyond plain text (`tool_calls`, `logprobs`, `/completions`, `/embeddings`):
`tool_calls` are `FakeCall`s whose arguments stream as the given fragments, one per chunk (with
`interleave`, the fragments of parallel calls alternate, several in one chunk, as some
providers send them); with `logprobs` asked, every content chunk carries its token's logprob
and `top_logprobs` alternatives (with `call_logprobs`, every tool-call chunk too);
`/completions` answers `text_completion`s (legacy logprobs); `/embeddings` answers
`embedding_of(text)` vectors, as floats or base64 as asked.

Scripted: `fp.script = [Behaviour.error(500)]` answers the next chat requests with those
behaviours, one each, then with `behaviour` again (a provider that fails once); `per_model`
maps an upstream model id to the behaviour its requests get (one model failing while the
provider's others work).

As its own process (so a test can SIGSTOP it: a provider that hangs with its port open):

    python -m tests.fake_provider --models m1,m2 [--chunks '["a", "b"]'] [--chunk-delay S]

prints `port N` on its first line, then serves until it is killed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class FakeCall:
    """A tool call the fake answers with: its arguments streamed in these fragments."""

    id: str
    name: str
    fragments: tuple[str, ...]

    @property
    def arguments(self) -> str:
        return "".join(self.fragments)


@dataclass(frozen=True)
class Behaviour:
    mode: str = "ok"  # ok | down | slow | status | garbage | disconnect
    chunks: tuple[str, ...] = ("Hello", ",", " world", "!")  # choice i > 0 adds " #i"
    finish_reason: str = "stop"
    prompt_tokens: int = 7
    completion_tokens: int | None = None  # default: the number of content chunks sent
    cached_tokens: int = 0
    send_usage: bool = True  # a usage chunk when the request asks for one
    send_done: bool = True  # the closing `data: [DONE]`
    delay: float = 0.0  # before the response headers
    chunk_delay: float = 0.0  # between two chunks
    status: int = 500
    error_message: str = "the fake provider is unhappy"
    error_code: str | None = None
    retry_after: float | None = None  # sent as retry-after-ms and Retry-After (whole seconds)
    garbage: bytes = b"data: {this is not json\n\n"
    disconnect_after: int = 1  # content chunks before a disconnect, stall or malformed chunk
    prefill: bool = False  # continue a trailing assistant message (see the module docstring)
    rate_limited_keys: frozenset[str] = frozenset()
    rejected_keys: frozenset[str] = frozenset()
    models_status: int = 200
    ignore_stream: bool = False  # answer one whole JSON completion even when asked to stream
    # --- the OpenAI surface beyond text (tool calls, logprobs, completions, embeddings) ---
    tool_calls: tuple[FakeCall, ...] = ()  # answered after the text chunks (finish: tool_calls)
    interleave: bool = False  # parallel calls' fragments alternate, one of each call per chunk
    call_logprobs: bool = False  # with logprobs asked, tool-call chunks carry their tokens' too
    embedding_dims: int = 8

    @classmethod
    def down(cls) -> Behaviour:
        return cls(mode="down")

    @classmethod
    def slow(cls, delay: float) -> Behaviour:
        return cls(mode="slow", delay=delay)

    @classmethod
    def error(
        cls,
        status: int,
        message: str = "the fake provider is unhappy",
        *,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> Behaviour:
        return cls(mode="status", status=status, error_message=message, error_code=code, retry_after=retry_after)

    @classmethod
    def garbled(cls, body: bytes = b"data: {this is not json\n\n") -> Behaviour:
        return cls(mode="garbage", garbage=body)

    @classmethod
    def dropping(cls, after: int = 1) -> Behaviour:
        return cls(mode="disconnect", disconnect_after=after)

    @classmethod
    def stalling(cls, after: int = 1) -> Behaviour:
        return cls(mode="stall", disconnect_after=after)

    @classmethod
    def malformed(cls, after: int = 1) -> Behaviour:
        return cls(mode="malformed", disconnect_after=after)

    def pieces(self, index: int) -> tuple[str, ...]:
        return self.chunks + ((f" #{index}",) if index else ())

    def text(self, index: int = 0) -> str:
        return "".join(self.pieces(index))


@dataclass
class Seen:
    method: str
    path: str
    key: str | None
    headers: dict[str, str]
    body: Any
    client: tuple[str, int] | None = None  # the caller's address: one port = one reused connection
    disconnected: bool = False  # the client left before the answer was complete
    completed: bool = False


class _Drop(Exception):
    """Raised inside the app after the headers went out: uvicorn drops the connection."""


class FakeProvider:
    """See the module docstring."""

    def __init__(self, behaviour: Behaviour | None = None, *, models: tuple[str, ...] = ("fake-model",)) -> None:
        self.behaviour_ = behaviour or Behaviour()
        self.script: list[Behaviour] = []  # the next chat requests' behaviours, one each
        self.per_model: dict[str, Behaviour] = {}  # upstream model id -> its requests' behaviour
        self.models = models
        self.requests: list[Seen] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._serving: asyncio.Task[None] | None = None
        self._placeholder: socket.socket | None = None

    # --- control (from the test's thread) -------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def behaviour(self) -> Behaviour:
        return self.behaviour_

    @behaviour.setter
    def behaviour(self, behaviour: Behaviour) -> None:
        was_down = self.behaviour_.mode == "down"
        self.behaviour_ = behaviour
        if self._loop is not None and was_down != (behaviour.mode == "down"):
            self._call(self._stop_serving() if behaviour.mode == "down" else self._serve())

    async def aset(self, behaviour: Behaviour) -> None:
        """Set the behaviour without blocking the caller's event loop (going down takes ~0.1 s)."""
        await asyncio.to_thread(setattr, self, "behaviour", behaviour)

    def start(self) -> Self:
        self._placeholder = _bound_socket(0)
        self.port = self._placeholder.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fake-provider-{self.port}", daemon=True)
        self._thread.start()
        if self.behaviour_.mode != "down":
            self._call(self._serve())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._stop_serving())
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    def chat_requests(self) -> list[Seen]:
        return [s for s in self.requests if s.path.endswith("/chat/completions")]

    def chat_keys(self) -> list[str | None]:
        return [s.key for s in self.chat_requests()]

    @property
    def disconnects(self) -> int:
        return sum(1 for s in self.requests if s.disconnected)

    def config_entry(
        self, name: str, *, keys: tuple[str, ...] = ("sk-fake-1",), models: dict[str, str] | None = None, **extra: Any
    ) -> dict[str, Any]:
        """A provider entry for a provider config that points at this fake (literal keys)."""
        return {
            "name": name,
            "base_url": self.base_url,
            "api_keys": list(keys),
            "models": models or {m: m for m in self.models},
            "probe_interval": 0,
            **extra,
        }

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=15)

    # --- the server (on its own loop) ------------------------------------------------------

    async def _serve(self) -> None:
        if self._placeholder is not None:
            self._placeholder.close()
        self._placeholder = None
        sock = _bound_socket(self.port)
        config = uvicorn.Config(
            self._app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
            ws="none",
            interface="asgi3",
        )
        self._server = uvicorn.Server(config)
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        for _ in range(500):
            if self._server.started or self._serving.done():
                break
            await asyncio.sleep(0.01)
        if not self._server.started:
            raise RuntimeError("the fake provider did not start")

    async def _stop_serving(self) -> None:
        if self._server is None or self._serving is None:
            return
        self._server.should_exit = True
        await asyncio.wait_for(self._serving, timeout=10)
        self._server = self._serving = None
        self._placeholder = _bound_socket(self.port)  # keeps the port: connecting is refused

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        b = self.behaviour_
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        raw = b""
        for _ in range(100_000):
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        client = scope.get("client")
        seen = Seen(
            scope["method"],
            scope["path"],
            auth.removeprefix("Bearer ") if auth else None,
            headers,
            body,
            tuple(client) if client else None,
        )
        self.requests.append(seen)
        if scope["path"].endswith("/models") and scope["method"] == "GET":
            data = {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models],
            }
            await _json(send, b.models_status, data if b.models_status < 400 else _error_body("no", None))
        elif scope["path"].endswith("/chat/completions") and scope["method"] == "POST":
            await self._chat(self._chat_behaviour(b, seen), seen, receive, send)
        elif scope["path"].endswith("/completions") and scope["method"] == "POST":
            await self._chat(self._chat_behaviour(b, seen), seen, receive, send, legacy=True)
        elif scope["path"].endswith("/embeddings") and scope["method"] == "POST":
            await _embeddings(b, seen, send)
        else:
            await _json(send, 404, _error_body(f"no route {scope['path']}", "not_found"))

    def _chat_behaviour(self, b: Behaviour, seen: Seen) -> Behaviour:
        model = seen.body.get("model") if isinstance(seen.body, dict) else None
        if isinstance(model, str) and model in self.per_model:
            return self.per_model[model]
        if self.script:
            return self.script.pop(0)
        return b

    async def _chat(self, b: Behaviour, seen: Seen, receive: Receive, send: Send, *, legacy: bool = False) -> None:
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self._answer(b, seen, gone, send, legacy)
        finally:
            watcher.cancel()

    async def _answer(self, b: Behaviour, seen: Seen, gone: asyncio.Event, send: Send, legacy: bool) -> None:
        key = seen.key or ""
        if key in b.rejected_keys:
            return await _json(send, 401, _error_body(f"Incorrect API key provided: {key}.", "invalid_api_key"))
        if key in b.rate_limited_keys:
            return await _json(
                send, 429, _error_body("Rate limit reached.", "rate_limit_exceeded"), _retry_headers(b.retry_after)
            )
        if b.delay and await _wait(gone, b.delay):
            seen.disconnected = True
            return
        if b.mode == "status":
            return await _json(
                send, b.status, _error_body(b.error_message, b.error_code), _retry_headers(b.retry_after)
            )
        if b.mode == "garbage":
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            await send({"type": "http.response.body", "body": b.garbage})
            seen.completed = True
            return
        request = seen.body if isinstance(seen.body, dict) else {}
        prompts = request.get("prompt") if legacy else None
        n = int(request.get("n") or 1) * (len(prompts) if isinstance(prompts, list) and prompts else 1)
        model = str(request.get("model", "fake"))
        completion = b.completion_tokens if b.completion_tokens is not None else sum(len(b.pieces(i)) for i in range(n))
        completion += 0 if b.completion_tokens is not None else n * sum(len(c.fragments) + 1 for c in b.tool_calls)
        if b.prefill and n == 1 and b.completion_tokens is None:
            completion -= _prefilled(b, request)  # what the assistant message held was not generated here
        shape = _Shape(b, request, legacy)
        usage = {
            "prompt_tokens": b.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": b.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": b.cached_tokens},
        }
        if not request.get("stream") or b.ignore_stream:
            choices = [shape.whole(i) for i in range(n)]
            await _json(
                send,
                200,
                {
                    "id": "chatcmpl-fake",
                    "object": "text_completion" if legacy else "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": choices,
                    "usage": usage,
                },
            )
            seen.completed = True
            return
        await self._stream(
            b,
            seen,
            gone,
            send,
            n,
            model,
            usage,
            bool((request.get("stream_options") or {}).get("include_usage")),
            shape,
        )

    async def _stream(
        self,
        b: Behaviour,
        seen: Seen,
        gone: asyncio.Event,
        send: Send,
        n: int,
        model: str,
        usage: dict[str, Any],
        include_usage: bool,
        shape: _Shape,
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )

        async def event(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {
                "id": "chatcmpl-fake",
                "object": "text_completion" if shape.legacy else "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": choices,
                **extra,
            }

        if not shape.legacy:
            await event(
                chunk(
                    [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                        for i in range(n)
                    ]
                )
            )
        sent = 0
        skip = _prefilled(b, seen.body) if b.prefill and n == 1 else 0
        longest = max(len(b.pieces(i)) for i in range(n))
        for j in range(skip, longest):
            for i in range(n):
                pieces = b.pieces(i)
                if j < len(pieces):
                    if b.mode in ("disconnect", "stall", "malformed") and sent >= b.disconnect_after:
                        if b.mode == "stall":
                            await _wait(gone, 600.0)
                            seen.disconnected = True
                            return
                        if b.mode == "malformed":
                            await send({"type": "http.response.body", "body": b"data: {not json\n\n"})
                            return
                        raise _Drop("the fake provider drops the connection")
                    await event(chunk([shape.text_choice(i, pieces[j], j)]))
                    sent += 1
            if gone.is_set() or (b.chunk_delay and await _wait(gone, b.chunk_delay)):
                seen.disconnected = True
                return
        for i in range(n):
            for calls in shape.call_chunks():
                await event(
                    chunk(
                        [
                            {
                                "index": i,
                                "delta": {"tool_calls": calls},
                                "logprobs": shape.call_logprobs(calls),
                                "finish_reason": None,
                            }
                        ]
                    )
                )
                if gone.is_set() or (b.chunk_delay and await _wait(gone, b.chunk_delay)):
                    seen.disconnected = True
                    return
        await event(chunk([shape.end_choice(i) for i in range(n)]))
        if include_usage and b.send_usage:
            await event(chunk([], usage=usage))
        if b.send_done:
            await event("[DONE]")
        await send({"type": "http.response.body", "body": b""})
        seen.completed = True


class _Shape:
    """How one request's answer looks: chat or legacy completions, with logprobs when asked."""

    def __init__(self, b: Behaviour, request: dict[str, Any], legacy: bool) -> None:
        self.b = b
        self.legacy = legacy
        asked = request.get("logprobs")
        self.logprobs = (asked is not None and asked is not False) if legacy else bool(asked)
        self.top = int(asked or 0) if legacy else int(request.get("top_logprobs") or 0)
        self.finish = "tool_calls" if b.tool_calls and b.finish_reason == "stop" else b.finish_reason

    def logprob(self, token: str, position: int) -> dict[str, Any]:
        lp = -0.25 * (position + 1)
        top = [
            {"token": f"{token}~{k}", "logprob": lp - k - 1, "bytes": list(f"{token}~{k}".encode())}
            for k in range(self.top)
        ]
        return {"token": token, "logprob": lp, "bytes": list(token.encode()), "top_logprobs": top}

    def legacy_logprobs(self, tokens: list[str], first: int = 0) -> dict[str, Any]:
        entries = [self.logprob(t, first + j) for j, t in enumerate(tokens)]
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": [sum(len(t) for t in tokens[:j]) for j in range(len(tokens))],
        }

    def text_choice(self, index: int, token: str, position: int) -> dict[str, Any]:
        if self.legacy:
            lps = self.legacy_logprobs([token], position) if self.logprobs else None
            return {"index": index, "text": token, "logprobs": lps, "finish_reason": None}
        lps = {"content": [self.logprob(token, position)], "refusal": None} if self.logprobs else None
        return {"index": index, "delta": {"content": token}, "logprobs": lps, "finish_reason": None}

    def call_logprobs(self, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
        """A tool-call chunk's logprobs: none, unless `call_logprobs` (an upstream that reports
        the logprobs of a call's tokens too, a token for each fragment)."""
        if not (self.logprobs and self.b.call_logprobs):
            return None
        tokens = [c["function"]["arguments"] or c["function"].get("name", "") for c in calls]
        return {"content": [self.logprob(t, j) for j, t in enumerate(tokens)], "refusal": None}

    def end_choice(self, index: int) -> dict[str, Any]:
        if self.legacy:
            return {"index": index, "text": "", "logprobs": None, "finish_reason": self.finish}
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": self.finish}

    def call_chunks(self) -> list[list[dict[str, Any]]]:
        """The tool-call deltas, one list per chunk: each call's head (id, name, empty arguments),
        then its fragments; with `interleave`, the calls' heads in one chunk, then one fragment
        of each call per chunk."""
        if self.legacy or not self.b.tool_calls:
            return []

        def head(k: int, c: FakeCall) -> dict[str, Any]:
            return {"index": k, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}

        def part(k: int, fragment: str) -> dict[str, Any]:
            return {"index": k, "function": {"arguments": fragment}}

        calls = list(enumerate(self.b.tool_calls))
        if not self.b.interleave:
            return [[d] for k, c in calls for d in (head(k, c), *(part(k, f) for f in c.fragments))]
        out = [[head(k, c) for k, c in calls]]
        for j in range(max(len(c.fragments) for c in self.b.tool_calls)):
            out.append([part(k, c.fragments[j]) for k, c in calls if j < len(c.fragments)])
        return out

    def whole(self, index: int) -> dict[str, Any]:
        tokens = list(self.b.pieces(index))
        text = "".join(tokens)
        if self.legacy:
            lps = self.legacy_logprobs(tokens) if self.logprobs else None
            return {"index": index, "text": text, "logprobs": lps, "finish_reason": self.finish}
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if self.b.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.b.tool_calls
            ]
        lps = (
            {"content": [self.logprob(t, j) for j, t in enumerate(tokens)], "refusal": None} if self.logprobs else None
        )
        return {"index": index, "message": message, "finish_reason": self.finish, "logprobs": lps}


def embedding_of(text: str, dims: int = 8) -> list[float]:
    """The fake's embedding of a text: deterministic float32 values from its SHA-256."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[k % 32] - 128) / 128 for k in range(dims)]
    return list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *raw)))


async def _embeddings(b: Behaviour, seen: Seen, send: Send) -> None:
    if b.mode == "status":
        return await _json(send, b.status, _error_body(b.error_message, b.error_code), _retry_headers(b.retry_after))
    request = seen.body if isinstance(seen.body, dict) else {}
    inputs = request.get("input")
    inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
    as_base64 = request.get("encoding_format") == "base64"
    data = []
    for i, text in enumerate(inputs):
        vector = embedding_of(str(text), b.embedding_dims)
        value: Any = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = sum(len(str(t).split()) for t in inputs)
    body = {
        "object": "list",
        "data": data,
        "model": request.get("model", "fake"),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    await _json(send, 200, body)
    seen.completed = True


def _prefilled(b: Behaviour, body: Any) -> int:
    """How many of the answer's chunks a trailing assistant message already holds."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        return 0
    held, text = 0, ""
    for piece in b.pieces(0):
        if not str(messages[-1].get("content") or "").startswith(text + piece):
            break
        text, held = text + piece, held + 1
    return held


def _bound_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `event` was set meanwhile."""
    try:
        await asyncio.wait_for(event.wait(), timeout=seconds)
        return True
    except TimeoutError:
        return False


def _error_body(message: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


def _retry_headers(retry_after: float | None) -> list[tuple[bytes, bytes]]:
    if retry_after is None:
        return []
    return [
        (b"retry-after-ms", str(int(retry_after * 1000)).encode()),
        (b"retry-after", str(math.ceil(retry_after)).encode()),
    ]


async def _json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": data})


def main() -> None:
    """See the module docstring: serve as a process until killed."""
    import argparse

    p = argparse.ArgumentParser(description="a fake OpenAI-compatible provider on 127.0.0.1")
    p.add_argument("--models", default="fake-model")
    p.add_argument("--chunks", default="", help="a JSON list of the content chunks of every answer")
    p.add_argument("--chunk-delay", type=float, default=0.0)
    a = p.parse_args()
    behaviour = Behaviour(chunk_delay=a.chunk_delay)
    if a.chunks:
        behaviour = Behaviour(chunks=tuple(json.loads(a.chunks)), chunk_delay=a.chunk_delay)
    fp = FakeProvider(behaviour, models=tuple(a.models.split(","))).start()
    print(f"port {fp.port}", flush=True)
    threading.Event().wait()


__all__ = ["Behaviour", "FakeCall", "FakeProvider", "Seen", "embedding_of"]

if __name__ == "__main__":
    main()
