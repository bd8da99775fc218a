"""A fast fake OpenAI-compatible upstream for benchmarks, in its own process on 127.0.0.1.

It answers `POST /v1/chat/completions` (whole, or streamed as server-sent events) with an answer
of `--tokens` tokens (fewer if the request's `max_tokens` / `max_completion_tokens` says so) and
usage, `stream_options.include_usage` honoured, and `GET /v1/models`. Any bearer key is accepted.
`--chunk-delay` spaces the streamed chunks out, to hold many streams open for memory tests.

Two servers, chosen with `--server`: `raw` (an asyncio protocol with httptools' parser, the
default: it is the fastest measured here, see bench/RESULTS.md) and `aiohttp`. Both run on uvloop
when it is installed.

    python bench/fast_upstream.py --port 9100 --tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools

TOKEN = "tok "  # one token of the answer: four characters, as a tokenizer's average


@dataclass(frozen=True, slots=True)
class Answers:
    """What the fake answers: built once, shared by both servers."""

    tokens: int
    chunk_delay: float
    models: tuple[str, ...]

    def models_body(self) -> bytes:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fast-upstream"} for m in self.models]
        return json.dumps({"object": "list", "data": data}).encode()

    def plan(self, body: bytes) -> tuple[dict[str, Any], int, int, bool, bool]:
        """(request, completion tokens, prompt tokens, stream, include usage) of a request body."""
        request = json.loads(body)
        if not isinstance(request, dict):
            raise ValueError("the body is not a JSON object")
        tokens = self.tokens
        for field in ("max_completion_tokens", "max_tokens"):
            cap = request.get(field)
            if isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
                tokens = min(tokens, cap)
        messages = request.get("messages") or []
        chars = sum(
            len(m.get("content") or "") for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str)
        )
        prompt = chars // 4 + 3 * len(messages)
        options = request.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        return request, tokens, prompt, bool(request.get("stream")), include_usage

    def completion(self, model: str, tokens: int, prompt: int) -> bytes:
        return json.dumps(
            {
                "id": f"chatcmpl-fast{time.monotonic_ns()}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": TOKEN * tokens, "refusal": None},
                        "finish_reason": "length" if tokens < self.tokens else "stop",
                        "logprobs": None,
                    }
                ],
                "usage": usage(prompt, tokens),
            }
        ).encode()

    def events(self, model: str, tokens: int, prompt: int, include_usage: bool) -> list[bytes]:
        """The SSE events of a streamed answer, `data: [DONE]` last."""
        head = {
            "id": f"chatcmpl-fast{time.monotonic_ns()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        if include_usage:
            head["usage"] = None

        def chunk(delta: dict[str, Any], reason: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return b"data: " + json.dumps({**head, "choices": [choice]}).encode() + b"\n\n"

        out = [chunk({"role": "assistant", "content": ""}, None)]
        out += [chunk({"content": TOKEN}, None) for _ in range(tokens)]
        out.append(chunk({}, "length" if tokens < self.tokens else "stop"))
        if include_usage:
            out.append(
                b"data: " + json.dumps({**head, "choices": [], "usage": usage(prompt, tokens)}).encode() + b"\n\n"
            )
        out.append(b"data: [DONE]\n\n")
        return out


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_body(message: str, code: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    ).encode()


# --- the raw server: asyncio protocol + httptools ---------------------------------------------

_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}


def _head(status: int, content_type: bytes, length: int | None) -> bytes:
    framing = b"transfer-encoding: chunked\r\n" if length is None else b"content-length: %d\r\n" % length
    return b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\n%sconnection: keep-alive\r\n\r\n" % (
        status,
        _REASONS.get(status, b"OK"),
        content_type,
        framing,
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class RawProtocol(asyncio.Protocol):
    """One connection: HTTP/1.1 keep-alive, requests answered in order (pipelining included)."""

    def __init__(self, answers: Answers) -> None:
        self._answers = answers
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._body: list[bytes] = []
        self._pending: list[tuple[bytes, bytes, bytes]] = []  # (method, url, body) while a slow stream runs
        self._busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self._transport is not None:
                self._transport.write(_head(400, b"application/json", 0))
                self._transport.close()

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = (self._parser.get_method(), self._url, b"".join(self._body))
        self._url, self._body = b"", []
        if self._busy:
            self._pending.append(request)
        else:
            self._answer(*request)

    def _answer(self, method: bytes, url: bytes, body: bytes) -> None:
        t = self._transport
        if t is None:
            return
        path = url.split(b"?", 1)[0]
        if path == b"/v1/models" and method == b"GET":
            data = self._answers.models_body()
            t.write(_head(200, b"application/json", len(data)) + data)
        elif path == b"/v1/chat/completions" and method == b"POST":
            self._chat(t, body)
        else:
            data = error_body(f"no route {method.decode()} {path.decode(errors='replace')}", "not_found")
            t.write(_head(404, b"application/json", len(data)) + data)

    def _chat(self, t: asyncio.Transport, body: bytes) -> None:
        try:
            request, tokens, prompt, stream, include_usage = self._answers.plan(body)
        except (ValueError, AttributeError) as e:
            data = error_body(f"bad request body: {e}")
            t.write(_head(400, b"application/json", len(data)) + data)
            return
        model = str(request.get("model") or "fast-model")
        if not stream:
            data = self._answers.completion(model, tokens, prompt)
            t.write(_head(200, b"application/json", len(data)) + data)
            return
        events = self._answers.events(model, tokens, prompt, include_usage)
        if self._answers.chunk_delay <= 0:
            t.write(_head(200, b"text/event-stream", None) + b"".join(map(_chunk, events)) + b"0\r\n\r\n")
            return
        self._busy = True
        t.write(_head(200, b"text/event-stream", None))
        asyncio.get_running_loop().create_task(self._slow(events))

    async def _slow(self, events: list[bytes]) -> None:
        try:
            for event in events:
                await asyncio.sleep(self._answers.chunk_delay)
                if self._transport is None:
                    return
                self._transport.write(_chunk(event))
            if self._transport is not None:
                self._transport.write(b"0\r\n\r\n")
        finally:
            self._busy = False
        while self._pending and not self._busy:
            self._answer(*self._pending.pop(0))


async def serve_raw(answers: Answers, host: str, port: int) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: RawProtocol(answers), host, port, backlog=4096, reuse_address=True)


# --- the aiohttp server ---------------------------------------------------------------------


async def serve_aiohttp(answers: Answers, host: str, port: int) -> Callable[[], Any]:
    from aiohttp import web

    async def models(_: web.Request) -> web.Response:
        return web.Response(body=answers.models_body(), content_type="application/json")

    async def chat(req: web.Request) -> web.StreamResponse:
        try:
            request, tokens, prompt, stream, include_usage = answers.plan(await req.read())
        except (ValueError, AttributeError) as e:
            return web.Response(status=400, body=error_body(f"bad request body: {e}"), content_type="application/json")
        model = str(request.get("model") or "fast-model")
        if not stream:
            return web.Response(body=answers.completion(model, tokens, prompt), content_type="application/json")
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(req)
        events = answers.events(model, tokens, prompt, include_usage)
        if answers.chunk_delay <= 0:
            await resp.write(b"".join(events))
        else:
            for event in events:
                await asyncio.sleep(answers.chunk_delay)
                await resp.write(event)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096, reuse_address=True).start()
    return runner.cleanup


async def main(a: argparse.Namespace) -> None:
    answers = Answers(a.tokens, a.chunk_delay, tuple(m for m in a.models.split(",") if m))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if a.server == "raw":
        server = await serve_raw(answers, a.host, a.port)
        print(f"fast-upstream ready on http://{a.host}:{a.port}/v1 (raw)", flush=True)
        await stop.wait()
        server.close()
    else:
        cleanup = await serve_aiohttp(answers, a.host, a.port)
        print(f"fast-upstream ready on http://{a.host}:{a.port}/v1 (aiohttp)", flush=True)
        await stop.wait()
        await cleanup()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--tokens", type=int, default=16, help="tokens per answer (a request's max_tokens may lower it)")
    p.add_argument("--chunk-delay", type=float, default=0.0, help="seconds before each streamed chunk (0: all at once)")
    p.add_argument("--models", default="fast-model", help="comma-separated ids listed by /v1/models")
    p.add_argument("--server", choices=("raw", "aiohttp"), default="raw")
    return p


def run(argv: list[str] | None = None) -> None:
    a = parser().parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main(a))
    else:
        uvloop.run(main(a))


if __name__ == "__main__":
    run()
