"""The job envelope, the scheduler's request and reply, the gateway's stop, and node adverts.

Every message is a `schemas.codec` record (a msgpack map with a version; unknown keys ignored,
a missing required key a `WireError`). A job's life on the wire:

    gateway --Submission--> scheduler --Job (JetStream, Nats-Msg-Id=job id)--> worker
    gateway <--Start, Delta..., Done | Failed-- worker   (core NATS, job.reply: schemas.events;
                                                          its last token is a per-job secret)
    gateway --Stop--> worker                             (node control subject)
    gateway <--Done(finish=cancelled)-- worker           (what the stopped attempt used)

Volunteer nodes see the `Job`, so it carries no tenant, key or client address: those stay in
the `Submission`, which only the scheduler reads. The job's `ticket` names the tenant too, but
sealed (encrypted and authenticated to the job id) with a key only gateways hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.codec import WireError, need, pack, unpack
from schemas.nodes import NOTHING_SERVED, Hardware, Served
from schemas.tenancy import DEFAULT_TIER, PRIORITY_TIERS, Limits, Tier

ATTEMPTS_PER_DISPATCH = 1000  # JetStream deliveries of one dispatch stay far below this


@dataclass(frozen=True, slots=True)
class Job:
    """What a worker sees: the request and where to send events, nothing about who asked."""

    id: str
    model: str
    request: dict[str, Any]  # the validated OpenAI body, as the client sent it
    reply: str  # where its events go; holds a secret token (subjects.reply_subject): only who pulled it knows it
    deadline: float  # unix time; a worker drops a job it pulls after this
    dispatch: int = 1  # 1 for the first placement, +1 for each re-dispatch after a failed attempt
    streamed: bool = True  # the client reads a stream; a plain answer's first text may wait to ride with DONE
    request_id: str = ""  # the client's x-request-id (or the gateway's): every role logs it (schemas.trace)
    traceparent: str = ""  # W3C trace context of the gateway's span for this request
    # The gateway reads one heartbeat per worker for all its jobs (`schemas.beats`); a job from a
    # gateway before that (False) gets a heartbeat request of its own, as that gateway expects.
    beats: bool = True
    # Who asked, sealed by the gateway (`broker_api.tickets`): opaque to workers, carried back in
    # a `schemas.usage.WorkerReport` if the job's gateway dies, so the job is still billed.
    ticket: bytes = b""

    def attempt_id(self, delivery: int) -> int:
        """An attempt's id: larger for later dispatches, and within one for later deliveries."""
        return self.dispatch * ATTEMPTS_PER_DISPATCH + delivery

    @property
    def message_id(self) -> str:
        """Its `Nats-Msg-Id` on the work stream: whoever places it (a scheduler, a release, a
        gateway's lane) and however often, one placement per dispatch."""
        return f"{self.id}.{self.dispatch}"

    def encode(self) -> bytes:
        return pack(
            {
                "id": self.id,
                "model": self.model,
                "req": self.request,
                "reply": self.reply,
                "deadline": self.deadline,
                "dispatch": self.dispatch,
                "st": self.streamed,
                "rid": self.request_id,
                "tp": self.traceparent,
                "tk": self.ticket,
                "bt": self.beats,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Job:
        o = unpack(data)
        return cls(
            id=str(need(o, "id")),
            model=str(need(o, "model")),
            request=dict(need(o, "req")),
            reply=str(need(o, "reply")),
            deadline=float(need(o, "deadline")),
            dispatch=int(o.get("dispatch", 1)),
            streamed=bool(o.get("st", True)),  # a gateway from before: every first delta at once
            request_id=str(o.get("rid", "")),
            traceparent=str(o.get("tp", "")),
            ticket=_bytes(o.get("tk", b""), "ticket"),
            beats=bool(o.get("bt", False)),  # a gateway from before: one heartbeat request per job
        )


@dataclass(frozen=True, slots=True)
class Submission:
    """Gateway -> scheduler: a job to admit and place, and the facts admission needs.

    The gateway already resolved the key, so the key's and its org's limits travel here and
    the scheduler needs no look-up on the critical path.
    """

    job: Job
    tenant: str = ""  # the org
    key_id: str = ""
    priority: Tier = DEFAULT_TIER
    avoid: tuple[str, ...] = ()  # pools an earlier attempt of this job failed on
    # A re-dispatch: where the attempt before this one failed (its pool and node), so that the
    # scheduler counts the failure against that node's health (and, for a cloud route, the
    # provider's model) at once; empty when nothing ran or the failure was not the route's.
    failed_pool: str = ""
    failed_node: str = ""
    # A continuation: the request ends with the assistant text the client already has, to be
    # carried on. Only routes that declare assistant prefill may take it (`ModelAdvert`).
    continuation: bool = False
    # A continuation: the node whose attempt was given up on (failed, silent or idle). It is
    # placed only where another node can take it: a pool whose only node that is (dead, or
    # stopped) refuses it at once instead of queueing it for nobody.
    left_node: str = ""
    key_limits: Limits = Limits()
    org_limits: Limits = Limits()
    estimated_tokens: int = 0  # prompt estimate + max_tokens (the scheduler reserves its own grant: scheduler.limits)
    volunteer_ok: bool = False  # may run on idle-time nodes
    # A retry: the gateway already heard from an attempt of this dispatch, so the job is in its
    # work queue although no answer came (the scheduler that placed it died before answering).
    started: bool = False

    def encode(self) -> bytes:
        return pack(
            {
                "job": self.job.encode(),
                "tenant": self.tenant,
                "key": self.key_id,
                "prio": self.priority,
                "avoid": list(self.avoid),
                "klim": self.key_limits.to_dict(),
                "olim": self.org_limits.to_dict(),
                "est": self.estimated_tokens,
                "vol": self.volunteer_ok,
                "fail": [self.failed_pool, self.failed_node],
                "cont": self.continuation,
                "left": self.left_node,
                "started": self.started,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Submission:
        o = unpack(data)
        failed = o.get("fail") or ("", "")
        if not isinstance(failed, (list, tuple)) or len(failed) != 2:
            raise WireError(f"bad failed attempt {failed!r}")
        return cls(
            job=Job.decode(need(o, "job")),
            tenant=str(o.get("tenant", "")),
            key_id=str(o.get("key", "")),
            priority=_tier(o.get("prio", DEFAULT_TIER)),
            avoid=tuple(str(p) for p in o.get("avoid", ())),
            key_limits=Limits.from_dict(o.get("klim")),
            org_limits=Limits.from_dict(o.get("olim")),
            estimated_tokens=int(o.get("est", 0)),
            volunteer_ok=bool(o.get("vol", False)),
            failed_pool=str(failed[0]),
            failed_node=str(failed[1]),
            continuation=bool(o.get("cont", False)),
            left_node=str(o.get("left", "")),
            started=bool(o.get("started", False)),
        )


@dataclass(frozen=True, slots=True)
class Admission:
    """Scheduler -> gateway: the job is durably queued (`error` is None) or refused.

    A lane (`lane_credits` > 0) lets the gateway place up to that many more jobs of the same
    key and model straight on `pool`'s work queue within `lane_ttl` seconds, without asking:
    the pool had that many idle slots (see `scheduler.service`, "Lanes")."""

    error: dict[str, Any] | None = None  # schemas.errors wire form
    pool: str = ""
    live_workers: int = 0
    model: str = ""  # the model placed, when a `models` fallback list chose another than job.model
    lane_credits: int = 0
    lane_ttl: float = 0.0

    def encode(self) -> bytes:
        return pack(
            {
                "err": self.error,
                "pool": self.pool,
                "live": self.live_workers,
                "model": self.model,
                "lane": [self.lane_credits, self.lane_ttl],
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Admission:
        o = unpack(data)
        lane = o.get("lane") or (0, 0.0)
        return cls(
            error=o.get("err"),
            pool=str(o.get("pool", "")),
            live_workers=int(o.get("live", 0)),
            model=str(o.get("model", "")),
            lane_credits=int(lane[0]),
            lane_ttl=float(lane[1]),
        )


# Control, gateway -> worker (on the worker's node control subject, or as the reply to a
# heartbeat request).
CONTINUE = b""
STOP = b"stop"


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop this attempt of this job: its client left, or another attempt won."""

    job_id: str
    attempt: int
    reason: str

    def encode(self) -> bytes:
        return pack({"j": self.job_id, "a": self.attempt, "why": self.reason})

    @classmethod
    def decode(cls, data: bytes) -> Stop:
        o = unpack(data)
        return cls(job_id=str(need(o, "j")), attempt=int(o.get("a", 0)), reason=str(o.get("why", "")))


@dataclass(frozen=True, slots=True)
class ModelAdvert:
    """One model a node serves. Packed as a list; fields added later go at its end, so an older
    reader takes the ones it knows and a newer one defaults the ones an older node leaves out."""

    id: str
    context_length: int = 0
    owned_by: str = "tokenyard"
    input_price: float = 0.0  # USD per million prompt tokens on this route (0: own capacity)
    output_price: float = 0.0  # USD per million completion tokens
    # False: the node is up but this model should get no new jobs there (a cloud adapter whose
    # provider keeps failing or timing out for this model; its other models may be fine).
    healthy: bool = True
    # The route continues a trailing assistant message as the start of its answer (assistant
    # prefill), so an answer cut elsewhere may be carried on here. False for an older node,
    # which never says: such a route is never given a continuation.
    assistant_prefill: bool = False

    def pack(self) -> list[Any]:
        return [
            self.id,
            self.context_length,
            self.owned_by,
            self.input_price,
            self.output_price,
            self.healthy,
            self.assistant_prefill,
        ]

    @classmethod
    def unpack(cls, m: list[Any]) -> ModelAdvert:
        return cls(
            str(m[0]),
            int(m[1]),
            str(m[2]),
            float(m[3]) if len(m) > 3 else 0.0,
            float(m[4]) if len(m) > 4 else 0.0,
            bool(m[5]) if len(m) > 5 else True,
            bool(m[6]) if len(m) > 6 else False,
        )


NodeKind = Literal["own", "volunteer", "cloud"]  # dedicated capacity, idle-time capacity, an upstream provider
NODE_KINDS: tuple[NodeKind, ...] = ("own", "volunteer", "cloud")


@dataclass(frozen=True, slots=True)
class NodeAdvert:
    """A worker's heartbeat on the fleet subject: who it is, what it serves, how free it is."""

    node: str
    pool: str
    models: tuple[ModelAdvert, ...]
    slots_total: int
    slots_free: int
    draining: bool = False
    interval: float = 1.0  # seconds until the next advert; silence for ~3 of these means gone
    started: float = field(default=0.0)
    kind: NodeKind = "own"
    healthy: bool = True  # false: the node is up but should get no new jobs (e.g. its provider is down)
    health_since: float = 0.0  # unix time `healthy` last changed (0: never, healthy since it started)
    # An idle-time node whose owner is using the machine: it takes no jobs until it is idle
    # again. `draining` is set too, so a scheduler that does not know this field skips it.
    paused: bool = False
    hardware: Hardware | None = None  # None: not told (an older worker)
    served: Served = NOTHING_SERVED  # since `started`

    def encode(self) -> bytes:
        return pack(
            {
                "node": self.node,
                "pool": self.pool,
                "models": [m.pack() for m in self.models],
                "total": self.slots_total,
                "free": self.slots_free,
                "drain": self.draining,
                "every": self.interval,
                "started": self.started,
                "kind": self.kind,
                "healthy": self.healthy,
                "hsince": self.health_since,
                "paused": self.paused,
                "served": self.served.to_wire(),
                "hw": None if self.hardware is None else self.hardware.to_wire(),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> NodeAdvert:
        o = unpack(data)
        try:
            models = tuple(ModelAdvert.unpack(m) for m in o.get("models", ()))
        except (TypeError, ValueError, IndexError) as e:
            raise WireError(f"bad models: {e}") from e
        return cls(
            node=str(need(o, "node")),
            pool=str(need(o, "pool")),
            models=models,
            slots_total=int(o.get("total", 0)),
            slots_free=int(o.get("free", 0)),
            draining=bool(o.get("drain", False)),
            interval=float(o.get("every", 1.0)),
            started=float(o.get("started", 0.0)),
            kind=_node_kind(o.get("kind", "own")),
            healthy=bool(o.get("healthy", True)),
            health_since=float(o.get("hsince", 0.0)),
            paused=bool(o.get("paused", False)),
            hardware=Hardware.from_wire(o["hw"]) if o.get("hw") is not None else None,
            served=Served.from_wire(o["served"]) if o.get("served") is not None else NOTHING_SERVED,
        )


def encode_model_list(models: list[ModelAdvert]) -> bytes:
    return pack({"models": [m.pack() for m in models]})


def decode_model_list(data: bytes) -> list[ModelAdvert]:
    o = unpack(data)
    return [ModelAdvert.unpack(m) for m in o.get("models", ())]


def _bytes(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise WireError(f"{what} must be bytes")
    return value


def _tier(value: Any) -> Tier:
    if value not in PRIORITY_TIERS:
        raise WireError(f"unknown priority tier {value!r}")
    return value  # type: ignore[no-any-return]


def _node_kind(value: Any) -> NodeKind:
    if value not in NODE_KINDS:
        raise WireError(f"unknown node kind {value!r}")
    return value  # type: ignore[no-any-return]
