"""Optional OpenTelemetry traces: one span per hop of a request, exported over OTLP/HTTP.

    api.request  (the gateway; its parent is the client's `traceparent`, if it sent one)
      └── scheduler.admit  (the admission and placement)
            └── worker.job  (one attempt on a worker)

With no endpoint configured (`--otlp-endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT`) nothing
is traced and nothing is imported; the request ids and `traceparent` still travel in the job
envelope (`schemas.trace`) and are logged. Like uvloop in `schemas.logs`, OpenTelemetry is an
optional package (`pip install 'tokenyard[otel]'`) imported only when it is configured, so this
module stays importable everywhere; an endpoint without the package is logged once with the fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog

from schemas import trace

log = structlog.get_logger(__name__)

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True, slots=True)
class Hop:
    """This hop's span: its traceparent (for the next hop's envelope) and, when exporting, the span."""

    traceparent: str
    span: Any = None

    def annotate(self, **attributes: str | int) -> None:
        if self.span is not None:
            self.span.set_attributes(attributes)


class Tracing:
    """Build with `start`; `span` is a no-op (it only continues the trace id) when not exporting."""

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider

    @property
    def exporting(self) -> bool:
        return self._tracer is not None

    @classmethod
    def start(cls, endpoint: str, *, role: str) -> Tracing:
        if not endpoint:
            return cls()
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("otel.unavailable", fix="pip install 'tokenyard[otel]', or unset --otlp-endpoint")
            return cls()
        url = endpoint.rstrip("/")
        url = url if url.endswith(TRACES_PATH) else url + TRACES_PATH
        provider = TracerProvider(resource=Resource.create({"service.name": f"tokenyard-{role}"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        log.info("otel.exporting", endpoint=url)
        return cls(provider.get_tracer("tokenyard"), provider)

    @contextlib.contextmanager
    def span(self, name: str, parent: str, **attributes: str | int) -> Iterator[Hop]:
        """A span for this hop, child of `parent` (a traceparent; "" or invalid starts a trace)."""
        if self._tracer is None:
            yield Hop(trace.traceparent(parent))
            return
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        propagator = TraceContextTextMapPropagator()
        context = propagator.extract({"traceparent": parent}) if trace.trace_id(parent) else None
        with self._tracer.start_as_current_span(name, context=context, attributes=attributes) as span:
            carrier: dict[str, str] = {}
            propagator.inject(carrier)
            yield Hop(carrier.get("traceparent") or trace.traceparent(parent), span)

    def close(self) -> None:
        """Export what is buffered (bounded by the SDK's own timeouts), then stop."""
        if self._provider is not None:
            self._provider.shutdown()
