"""One log format and one event loop set-up for every role.

This is the one module of `schemas/` that is not wire data: it holds the process conventions
every role shares (structured logs on stderr, uvloop when installed, closing the NATS
connection), so they are defined once. It imports only structlog and the stdlib (the NATS
client is passed in), and does nothing at import.

Logs: structlog's own loggers and the standard library's (httpx, uvicorn, nats, asyncio) go
through one pipeline: `ProcessorFormatter` renders stdlib records with the same processors,
so `--log-json` gives one JSON object per line whoever logged it, each with the role that
wrote it (`role`) and whatever the request bound (`request_id`, `job_id`, `model`: structlog
context variables, bound at each boundary). httpx's one info line per HTTP request is demoted
to warning: a cloud adapter's probe every few seconds is not news.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Coroutine, MutableMapping
from typing import Any, Protocol, TypeVar

import structlog

T = TypeVar("T")

# Libraries whose info lines are per request or per connection: only their warnings are kept.
CHATTY_LOGGERS = ("httpx", "httpcore", "hpack", "uvicorn.access", "nats.aio.client")


def _with_role(role: str) -> Any:
    def add_role(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("role", role)
        return event

    return add_role


def configure_logging(level: str = "info", as_json: bool = False, *, role: str = "") -> None:
    """Send structlog and stdlib logging through one renderer on stderr, at `level`."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise SystemExit(f"unknown log level {level!r} (debug, info, warning or error)")
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    if role:
        shared.append(_with_role(role))
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    tail: list[Any] = [structlog.processors.format_exc_info] if as_json else []
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    structlog.configure(
        processors=[
            *shared,
            *(tail if as_json else [structlog.processors.StackInfoRenderer()]),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class _Closable(Protocol):
    async def flush(self, timeout: int = ...) -> None: ...
    async def close(self) -> None: ...


async def close_quietly(nc: _Closable, timeout: int = 2) -> None:
    """Flush what was published, then close. Not `drain()`: with pull subscriptions in flight,
    nats-py's drain can wait out its whole 30 s timeout; each role settles its own work first."""
    with contextlib.suppress(Exception):
        await nc.flush(timeout=timeout)
    with contextlib.suppress(Exception):
        await nc.close()


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a role's main coroutine, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
