"""OpenTelemetry (the [otel] extra): with an OTLP endpoint configured, one request is one trace
of three spans, api.request -> scheduler.admit -> worker.job, under the client's traceparent.
The collector is a real HTTP server on 127.0.0.1 that decodes what the exporters send."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from schemas.otel import Tracing
from schemas.trace import request_id, trace_id, traceparent
from tests.helpers import ECHO
from tests.stack import Stack, auth_headers

trace_pb2 = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def collector() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An OTLP/HTTP trace receiver: (its URL, the spans it got)."""
    spans: list[dict[str, Any]] = []

    class Receive(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            request = trace_pb2.ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource in request.resource_spans:
                service = next(a.value.string_value for a in resource.resource.attributes if a.key == "service.name")
                for scope in resource.scope_spans:
                    for s in scope.spans:
                        spans.append(
                            {
                                "service": service,
                                "name": s.name,
                                "trace": s.trace_id.hex(),
                                "id": s.span_id.hex(),
                                "parent": s.parent_span_id.hex(),
                            }
                        )
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", spans
    finally:
        server.shutdown()
        server.server_close()


def test_request_ids_and_traceparents() -> None:
    assert request_id("my-trace-123") == "my-trace-123"
    for bad in ("", None, "x" * 129, "tab\there"):
        assert request_id(bad).startswith("req_") and len(request_id(bad)) == 36
    continued = traceparent(f"00-{TRACE}-{PARENT}-01")
    assert continued.startswith(f"00-{TRACE}-") and continued.endswith("-01") and PARENT not in continued
    for bad in ("", "00-" + "0" * 32 + f"-{PARENT}-01", f"ff-{TRACE}-{PARENT}-01", f"00-{TRACE}-{PARENT}"):
        fresh = traceparent(bad)
        assert trace_id(fresh) not in ("", TRACE, "0" * 32) and fresh.endswith("-01")


def test_without_an_endpoint_a_span_only_continues_the_trace() -> None:
    with Tracing.start("", role="api").span("api.request", f"00-{TRACE}-{PARENT}-01") as hop:
        assert trace_id(hop.traceparent) == TRACE and PARENT not in hop.traceparent
    assert trace_id(traceparent("garbage")) not in ("", TRACE)


async def test_one_request_is_one_trace_across_the_roles(
    tmp_path: Path, collector: tuple[str, list[dict[str, Any]]]
) -> None:
    url, spans = collector
    env = {"TOKENYARD_OTLP_ENDPOINT": url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    stack = Stack(tmp_path)
    stack.start_nats()
    try:
        stack.start_scheduler(**env)
        stack.start_worker(**env)
        _, api = await stack.spawn_api(**env)
        stack.api_url = api
        await stack.wait_for_model(ECHO)
        async with httpx.AsyncClient(base_url=api, timeout=30) as http:
            headers = {**auth_headers(), "traceparent": f"00-{TRACE}-{PARENT}-01"}
            body = {"model": ECHO, "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 2}
            assert (await http.post("/v1/chat/completions", json=body, headers=headers)).status_code == 200
        deadline = time.monotonic() + 15
        names = {"api.request", "scheduler.admit", "worker.job"}
        while time.monotonic() < deadline and not names <= {s["name"] for s in spans if s["trace"] == TRACE}:
            await asyncio.sleep(0.1)
    finally:
        await stack.close()
    mine = {s["name"]: s for s in spans if s["trace"] == TRACE}
    assert names <= set(mine), spans
    assert mine["api.request"]["parent"] == PARENT and mine["api.request"]["service"] == "tokenyard-api"
    assert mine["scheduler.admit"]["parent"] == mine["api.request"]["id"]
    assert mine["worker.job"]["parent"] == mine["scheduler.admit"]["id"]
    assert mine["worker.job"]["service"] == "tokenyard-worker"
