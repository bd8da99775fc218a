"""One log format and one event loop set-up for every role.

This is the one module of `schemas/` that is not wire data: it holds the process conventions
every role shares (structured logs on stderr, uvloop when installed, closing the NATS
connection), so they are defined once. It imports only structlog and the stdlib (the NATS
client is passed in), and does nothing at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

import structlog

T = TypeVar("T")


def configure_logging(level: str = "info", as_json: bool = False) -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise SystemExit(f"unknown log level {level!r}")
    logging.basicConfig(level=numeric, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info if as_json else structlog.processors.StackInfoRenderer(),
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
