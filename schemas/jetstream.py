"""JetStream plumbing every role shares: making streams match their entry, consuming pulls,
following a watch. Written against the NATS client passed in (nats-py's, duck-typed), so
schemas/ still imports no NATS library, like `schemas.logs.close_quietly`.

- `ensure(nc, spec, replicas=...)`: create the stream of a `schemas.streams` entry, or bring an
  existing one to it; one behaviour for every stream and bucket, with replicas that follow the
  cluster's size. A change JetStream refuses (a retention change, say) is logged and the
  stream is used as it is. While the cluster has no JetStream leader (an election after a
  node died) it keeps asking, for up to `ENSURE_DEADLINE`.
- `consume(sub, handle, ...)`: pull batches forever and hand them to `handle`, which settles
  each message; `decode_batch` applies the explicit policy for messages nobody can read.
- `follow(open_watch, handle, ...)`: run a watch for as long as the role lives, reopened with a
  bounded back-off whenever it fails.
- `patiently(op, transient=..., patience=...)`: one operation asked again, with a growing
  pause, while its error is one a leader election ends (a stream with no leader after a node
  died): a job's publish, a placement claim, an admin write. What is left when the patience
  runs out is raised for the caller to translate.

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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import structlog

from schemas import subjects
from schemas.codec import WireError
from schemas.streams import CLUSTER_REPLICAS, BucketSpec, StreamSpec

log = structlog.get_logger(__name__)

T = TypeVar("T")

# JetStream API error codes (nats-server's errors.json).
CLUSTER_NO_PEERS = 10005  # no suitable peers for placement (fewer servers than replicas)
JETSTREAM_UNAVAILABLE = 10008  # "temporarily unavailable": no meta leader yet (an election)
INSUFFICIENT_RESOURCES = 10023  # e.g. fewer peers with room than replicas
STREAM_NAME_IN_USE = 10058  # a stream of that name exists with another configuration
STREAM_NOT_FOUND = 10059
REPLICAS_NOT_SUPPORTED = 10074  # replicas > 1 on a server that is not clustered
STORE_FAILED = 10077  # a publish the stream refused: full (max msgs, bytes, per subject)
# Answers that mean "this cluster cannot place that many replicas": the cluster is smaller.
TOO_FEW_PEERS = frozenset({CLUSTER_NO_PEERS, INSUFFICIENT_RESOURCES, REPLICAS_NOT_SUPPORTED})
API_TIMEOUT = 5.0  # one JetStream API call
ENSURE_DEADLINE = 60.0  # seconds `ensure` keeps asking while the cluster elects a meta leader
RETRY_PAUSE = 0.5
PATIENT_PAUSE = (0.1, 1.0)  # `patiently`: the first pause and the longest


async def patiently(
    op: Callable[[], Awaitable[T]],
    *,
    transient: Callable[[Exception], bool],
    patience: float,
    what: str,
    pause: tuple[float, float] = PATIENT_PAUSE,
) -> T:
    """`op`, asked again while its error is `transient` (pauses from `pause[0]`, doubling up to
    `pause[1]`), for up to `patience` seconds; then, or at once for any other error, that error
    propagates. Only for operations that are safe to ask twice (a publish with a message id, a
    KV create or compare-and-set, a put of the same value)."""
    deadline = time.monotonic() + patience
    wait = pause[0]
    while True:
        try:
            return await op()
        except Exception as e:
            if not transient(e) or time.monotonic() + wait >= deadline:
                raise
            log.info("nats.retry", what=what, error=repr(e), retry_in=wait)
        await asyncio.sleep(wait)
        wait = min(pause[1], wait * 2)


class JetStreamError(Exception):
    """A JetStream API call that answered with an error."""

    def __init__(self, err_code: int, description: str) -> None:
        super().__init__(f"{description} (err_code {err_code})")
        self.err_code = err_code
        self.description = description


class JetStreamUnavailableError(Exception):
    """The JetStream API did not answer in time (no meta leader, no quorum): try again later."""


def is_full(error: BaseException) -> bool:
    """Did a publish fail because the stream is full (discard=new at a limit)? Works on
    nats-py's `APIError` and on `JetStreamError`, by error code."""
    return getattr(error, "err_code", None) == STORE_FAILED


class Requester(Protocol):
    async def request(self, subject: str, payload: bytes = b"", timeout: float = ...) -> Any: ...


async def _api(nc: Requester, subject: str, body: dict[str, Any] | None, *, deadline: float) -> dict[str, Any]:
    """One JetStream API call, asked again (until `deadline`, monotonic) while the API is not
    answering: during a meta-leader election requests are lost or answered 10008. Creating
    and updating a stream with the same configuration twice is harmless, so a retry after a
    lost answer is too."""
    payload = json.dumps(body).encode() if body is not None else b""
    while True:
        try:
            reply = await nc.request(subject, payload, timeout=API_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # top of a retry loop: a timeout, no responders, a reconnect (nats-py's errors)
            problem: str = repr(e)
        else:
            answer: dict[str, Any] = json.loads(reply.data)
            error = answer.get("error")
            if not error:
                return answer
            code = int(error.get("err_code", 0))
            if code != JETSTREAM_UNAVAILABLE:
                raise JetStreamError(code, str(error.get("description", "")))
            problem = str(error.get("description", ""))
        if time.monotonic() >= deadline:
            raise JetStreamUnavailableError(f"the JetStream API did not answer {subject}: {problem}")
        log.info("jetstream.api_retry", subject=subject, error=problem)
        await asyncio.sleep(RETRY_PAUSE)


async def stream_info(nc: Requester, name: str, *, timeout: float = ENSURE_DEADLINE) -> dict[str, Any] | None:
    """The JetStream API's STREAM.INFO answer for a stream, None if there is no such stream."""
    try:
        return await _api(nc, subjects.js_stream_info(name), None, deadline=time.monotonic() + timeout)
    except JetStreamError as e:
        if e.err_code == STREAM_NOT_FOUND:
            return None
        raise


async def ensure(
    nc: Requester, spec: StreamSpec, *, replicas: int | None = None, patience: float = ENSURE_DEADLINE
) -> int:
    """Make the stream match `spec`; returns the replicas it has.

    `replicas` None follows the cluster (`schemas.streams.replicas_for` its size). The
    JetStream meta leader knows the cluster's peers, so it is asked directly: three replicas
    are asked for, and an answer that the cluster cannot place them (not clustered; too few
    peers: a 2-node cluster) means one. A 3-node cluster with one node down still places
    three (the missing peer catches up when it returns), and on 5 nodes three is what
    `replicas_for` wants. An existing stream
    is updated to match, replicas included: R1 streams from an older version become R3. It
    never lowers what an existing stream has (an operator's R5 stays R5). An explicit
    `replicas` is used as given, up or down. It keeps asking for `patience` seconds while the
    JetStream API does not answer, then raises `JetStreamUnavailableError`.
    """
    deadline = time.monotonic() + patience
    current = await stream_info(nc, spec.name, timeout=patience)
    have = int(current["config"].get("num_replicas", 1)) if current else 0
    want = replicas if replicas is not None else max(CLUSTER_REPLICAS, have)
    verb = subjects.js_stream_update if current else subjects.js_stream_create
    try:
        answer = await _api(nc, verb(spec.name), spec.config(want), deadline=deadline)
    except JetStreamError as e:
        if replicas is None and e.err_code in TOO_FEW_PEERS and want > 1:
            fits = max(1, have)
            log.info("stream.replicas_fit", stream=spec.name, asked=want, replicas=fits, err_code=e.err_code)
            return await _put(nc, spec, fits, current is not None, deadline)
        if e.err_code == STREAM_NAME_IN_USE:  # made meanwhile by another role: bring it to the entry
            return await _put(nc, spec, want, True, deadline)
        if current is not None:
            log.warning("stream.update_refused", stream=spec.name, error=e.description, err_code=e.err_code)
            return have
        raise
    return int(answer.get("config", {}).get("num_replicas", want))


async def _put(nc: Requester, spec: StreamSpec, replicas: int, exists: bool, deadline: float) -> int:
    verb = subjects.js_stream_update if exists else subjects.js_stream_create
    try:
        answer = await _api(nc, verb(spec.name), spec.config(replicas), deadline=deadline)
    except JetStreamError as e:
        if not exists:
            raise
        log.warning("stream.update_refused", stream=spec.name, error=e.description, err_code=e.err_code)
        return -1
    return int(answer.get("config", {}).get("num_replicas", replicas))


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


async def open_bucket(
    nc: Requester, js: BucketOpener[KV], spec: BucketSpec, *, replicas: int | None, patience: float = ENSURE_DEADLINE
) -> KV:
    """A KV bucket made to match its entry (`ensure`), bound with the client's KV API."""
    await ensure(nc, spec.stream, replicas=replicas, patience=patience)
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
