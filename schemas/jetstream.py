"""JetStream plumbing every role shares: making streams match their entry, consuming pulls,
following a watch. Written against the NATS client passed in (nats-py's, duck-typed), so
schemas/ still imports no NATS library, like `schemas.logs.close_quietly`.

- `ensure(nc, spec, replicas=...)`: create the stream of a `schemas.streams` entry, or bring an
  existing one to it; one behaviour for every stream and bucket. A change JetStream refuses
  (a retention change, say) is logged and the stream is used as it is.
- `consume(sub, handle, ...)`: pull batches forever and hand them to `handle`, which settles
  each message; `decode_batch` applies the explicit policy for messages nobody can read.
- `follow(open_watch, handle, ...)`: run a watch for as long as the role lives, reopened with a
  bounded back-off whenever it fails.

JetStream's errors are told apart by their numeric `err_code`, never by their text.

Both loops end when their task is cancelled, even if the cancellation was lost on the way: on
Python 3.11, `asyncio.wait_for` (which nats-py's `next_msg` uses) returns a message that
arrives as it is cancelled and drops the cancellation, so a loop that only waited for the
`CancelledError` ran on for ever under load and its role never exited. Each loop checks after
every wait whether its task was asked to stop (`stop_if_cancelled`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import structlog

from schemas import subjects
from schemas.codec import WireError
from schemas.streams import BucketSpec, StreamSpec

log = structlog.get_logger(__name__)

T = TypeVar("T")

# JetStream API error codes (nats-server's errors.json).
STREAM_NAME_IN_USE = 10058  # a stream of that name exists with another configuration
REPLICAS_NOT_SUPPORTED = 10074  # replicas > 1 on a server that is not clustered
INSUFFICIENT_RESOURCES = 10023  # e.g. fewer peers than replicas
STORE_FAILED = 10077  # a publish the stream refused: full (max msgs, bytes, per subject)
STREAM_NOT_FOUND = 10059
API_TIMEOUT = 5.0


class JetStreamError(Exception):
    """A JetStream API call that answered with an error."""

    def __init__(self, err_code: int, description: str) -> None:
        super().__init__(f"{description} (err_code {err_code})")
        self.err_code = err_code
        self.description = description


def is_full(error: BaseException) -> bool:
    """Did a publish fail because the stream is full (discard=new at a limit)? Works on
    nats-py's `APIError` and on `JetStreamError`, by error code."""
    return getattr(error, "err_code", None) == STORE_FAILED


class Requester(Protocol):
    async def request(self, subject: str, payload: bytes = b"", timeout: float = ...) -> Any: ...


async def _api(nc: Requester, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=API_TIMEOUT)
    answer: dict[str, Any] = json.loads(reply.data)
    error = answer.get("error")
    if error:
        raise JetStreamError(int(error.get("err_code", 0)), str(error.get("description", "")))
    return answer


async def ensure(nc: Requester, spec: StreamSpec, *, replicas: int | None = None) -> int:
    """Make the stream match `spec`; returns the replicas it has. `replicas` None follows the
    cluster: three where the server is clustered with room for them, else one."""
    want = replicas if replicas is not None else 3
    config = spec.config(want)
    try:
        try:
            await _api(nc, subjects.js_stream_create(spec.name), config)
        except JetStreamError as e:
            if replicas is None and e.err_code in (REPLICAS_NOT_SUPPORTED, INSUFFICIENT_RESOURCES):
                config = spec.config(1)
                await _api(nc, subjects.js_stream_create(spec.name), config)
            else:
                raise
    except JetStreamError as e:
        if e.err_code != STREAM_NAME_IN_USE:
            raise
        return await _update(nc, spec, config, replicas)
    return int(config["num_replicas"])


async def _update(nc: Requester, spec: StreamSpec, config: dict[str, Any], replicas: int | None) -> int:
    try:
        answer = await _api(nc, subjects.js_stream_update(spec.name), config)
    except JetStreamError as e:
        if replicas is None and e.err_code in (REPLICAS_NOT_SUPPORTED, INSUFFICIENT_RESOURCES):
            return await _update(nc, spec, spec.config(1), 1)
        log.warning("stream.update_refused", stream=spec.name, error=e.description, err_code=e.err_code)
        return -1
    return int(answer.get("config", {}).get("num_replicas", config["num_replicas"]))


def stop_if_cancelled() -> None:
    """Raise CancelledError if the running task was cancelled, even when the cancellation never
    reached it as an exception (see the module docstring)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# --- consuming ---------------------------------------------------------------------------


class Message(Protocol):
    data: bytes
    subject: str

    async def ack(self) -> None: ...
    async def term(self) -> None: ...


M = TypeVar("M", bound=Message)


class Fetcher(Protocol[M]):  # type: ignore[misc]
    async def fetch(self, batch: int = ..., timeout: float | None = ...) -> list[M]: ...


async def consume(
    sub: Fetcher[M],
    handle: Callable[[list[M]], Awaitable[None]],
    *,
    name: str,
    batch: int,
    wait: float,
    gather: float = 0.0,
    pause: float = 1.0,
) -> None:
    """Fetch up to `batch` messages at a time (waiting `wait` seconds for the first) and hand
    each batch to `handle`, forever. `handle` settles every message (ack, nak or term); what it
    leaves unsettled, because it raised, JetStream redelivers after the consumer's ack wait.
    After a short batch it lets `gather` seconds pass, so a quiet stream is read in fewer,
    larger batches."""
    while True:
        try:
            msgs = await sub.fetch(batch, timeout=wait)
        except TimeoutError:  # nats-py's own TimeoutError is an asyncio.TimeoutError too
            stop_if_cancelled()
            continue
        except asyncio.CancelledError:
            raise
        except Exception as e:  # top of a loop: log, pause, go on
            log.warning("consume.fetch_failed", consumer=name, error=repr(e))
            await asyncio.sleep(pause)
            continue
        stop_if_cancelled()  # unsettled, the batch comes back to whoever consumes next
        try:
            await handle(msgs)
        except asyncio.CancelledError:
            raise
        except Exception:  # top of a loop: the unsettled messages come back after the ack wait
            log.exception("consume.handle_failed", consumer=name, messages=len(msgs))
        if len(msgs) < batch and gather:
            await asyncio.sleep(gather)


async def decode_batch(msgs: Sequence[M], decode: Callable[[bytes], T], *, name: str) -> list[tuple[M, T]]:
    """Each message with its record. A message that cannot be decoded is logged and
    terminated: it would fail the same way on every redelivery, and must not block the rest."""
    out: list[tuple[M, T]] = []
    for msg in msgs:
        try:
            out.append((msg, decode(msg.data)))
        except WireError as e:
            log.error("consume.bad_record", consumer=name, subject=msg.subject, error=str(e))
            await msg.term()
    return out


# --- watching ----------------------------------------------------------------------------


async def follow(
    open_watch: Callable[[], AsyncIterator[T]],
    handle: Callable[[T], None],
    *,
    name: str,
    backoff: tuple[float, float] = (0.2, 5.0),
) -> None:
    """Run a watch for as long as the caller lives: `open_watch()` is an async iterator of its
    items (typically an async generator that subscribes), each goes to `handle`; when the watch
    fails or ends it is opened again after a pause that doubles from `backoff[0]` up to
    `backoff[1]`, and starts over from `backoff[0]` once items flow again."""
    pause = backoff[0]
    while True:
        try:
            async for item in open_watch():
                stop_if_cancelled()
                pause = backoff[0]
                try:
                    handle(item)
                except Exception:  # top of a loop: one odd entry must not end the watch
                    log.exception("watch.bad_item", watch=name)
            log.info("watch.ended", watch=name)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # top of a loop: meanwhile the view only gets staler
            log.warning("watch.failed", watch=name, error=repr(e), retry_in=pause)
        await asyncio.sleep(pause)
        pause = min(backoff[1], pause * 2)


KV = TypeVar("KV")


class BucketOpener(Protocol[KV]):  # type: ignore[misc]
    async def key_value(self, bucket: str) -> KV: ...


async def open_bucket(nc: Requester, js: BucketOpener[KV], spec: BucketSpec, *, replicas: int | None) -> KV:
    """A KV bucket made to match its entry (`ensure`), bound with the client's KV API."""
    await ensure(nc, spec.stream, replicas=replicas)
    return await js.key_value(spec.bucket)


async def work_queues(js: Any) -> list[tuple[str, str, int, int]]:
    """(pool, model, waiting, running) of every work-queue consumer, sorted; raises the
    client's error when JetStream does not answer (the caller decides)."""
    out = []
    for c in await js.consumers_info(subjects.WORK_STREAM):
        parsed = subjects.parse_work_subject(c.config.filter_subject or "")
        if parsed is not None:
            out.append((parsed[0], parsed[1], int(c.num_pending or 0), int(c.num_ack_pending or 0)))
    return sorted(out)
