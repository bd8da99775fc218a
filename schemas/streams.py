"""Every JetStream stream and KV bucket Tokenyard uses: one entry each, as data.

A `StreamSpec` is what the stream must be (subjects, retention, limits, dedupe window); a
`BucketSpec` is a KV bucket, which JetStream stores as a stream named `KV_<bucket>`. Limits
that operators set (the work queue's size, the cache's TTL) are applied to an entry with
`dataclasses.replace` by the role that owns the setting; nothing else defines a stream.

Replication is decided here too (`replicas_for`): every entry that must survive the loss of a
node follows the cluster (three replicas on a cluster of three or more, one on a single
server; never two: that loses availability with either node and buys no durability); the
response cache stays at one replica, since losing it costs only a recomputation, and a
replicated cache would triple the write cost of every cacheable answer. While the node holding
it is down the gateways treat every cache error as a miss (`broker_api.cache`). How many
replicas a cluster can place is the JetStream meta leader's answer (`schemas.jetstream.ensure`).

`schemas.jetstream.ensure` makes a stream match its entry. `config` gives the JetStream API's
own JSON (durations in nanoseconds), so schemas/ needs no NATS client to describe a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from schemas import subjects
from schemas.routing import HISTORY as ROUTING_HISTORY

DEDUPE_WINDOW = 120.0  # seconds a message id is remembered: retries after a lost ack are duplicates
MAX_JOB_BYTES = 1 << 20  # one job message; NATS's default max_payload is 1 MiB
NS = 1_000_000_000

Retention = Literal["limits", "workqueue", "interest"]
Discard = Literal["old", "new"]


@dataclass(frozen=True, slots=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    retention: Retention = "limits"
    discard: Discard = "old"
    max_age: float = 0.0  # seconds; 0 = kept until a limit removes it
    max_msgs: int = -1
    max_bytes: int = -1
    max_msgs_per_subject: int = -1
    discard_new_per_subject: bool = False
    max_msg_size: int = -1
    duplicate_window: float = DEDUPE_WINDOW
    replicated: bool = True  # False: one replica whatever the cluster (see the module docstring)
    kv: bool = False  # a KV bucket's stream: rollups, no deletes through the API, direct gets

    def config(self, replicas: int) -> dict[str, Any]:
        """The JetStream API's stream configuration for this entry."""
        out: dict[str, Any] = {
            "name": self.name,
            "subjects": list(self.subjects),
            "retention": self.retention,
            "storage": "file",
            "discard": self.discard,
            "max_age": int(self.max_age * NS),
            "max_msgs": self.max_msgs,
            "max_bytes": self.max_bytes,
            "max_msgs_per_subject": self.max_msgs_per_subject,
            "max_msg_size": self.max_msg_size,
            "duplicate_window": int(self.duplicate_window * NS),
            "num_replicas": replicas if self.replicated else 1,
        }
        if self.discard_new_per_subject:
            out["discard_new_per_subject"] = True
        if self.kv:
            out.update(allow_rollup_hdrs=True, deny_delete=True, allow_direct=True)
        return out


@dataclass(frozen=True, slots=True)
class BucketSpec:
    bucket: str
    history: int = 1
    ttl: float = 0.0  # seconds an entry lives after its last write; 0 = forever
    max_bytes: int = -1
    discard: Discard = "new"  # "old": a full bucket drops its oldest entries (the cache)
    replicated: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stream(self) -> StreamSpec:
        return StreamSpec(
            name=f"KV_{self.bucket}",
            subjects=(f"{subjects.kv_prefix(self.bucket)}>",),
            discard=self.discard,
            max_age=self.ttl,
            max_bytes=self.max_bytes,
            max_msgs_per_subject=self.history,
            duplicate_window=min(DEDUPE_WINDOW, self.ttl) if self.ttl else DEDUPE_WINDOW,
            replicated=self.replicated,
            kv=True,
        )


CLUSTER_REPLICAS = 3  # what a replicated entry has on a cluster that can place it


def replicas_for(cluster_size: int) -> int:
    """Replicas of a replicated entry on a cluster of this many servers: 3 where it fits, else
    1 (never 2: two replicas lose availability on either node's loss and buy no durability)."""
    return CLUSTER_REPLICAS if cluster_size >= CLUSTER_REPLICAS else 1


# --- the streams -------------------------------------------------------------------------

# One subject per (pool, model); workers pull them; discard=new: a full queue refuses (429).
WORK = StreamSpec(
    name=subjects.WORK_STREAM,
    subjects=(subjects.WORK_ALL,),
    retention="workqueue",
    discard="new",
    max_age=3600.0,
    max_msgs=100_000,
    max_bytes=1 << 30,
    max_msg_size=MAX_JOB_BYTES,
)
# Admitted jobs held back for fair release; one subject per tenant, capped per subject.
INTAKE = StreamSpec(
    name=subjects.INTAKE_STREAM,
    subjects=(subjects.INTAKE_ALL,),
    retention="workqueue",
    discard="new",
    max_msgs=100_000,
    max_msgs_per_subject=10_000,
    discard_new_per_subject=True,
    max_msg_size=MAX_JOB_BYTES + 4096,
)
# One usage record per job (message id = job id); read by ledgers and by settlement. Kept 30
# days, so a ledger that was down for weeks still catches up.
USAGE = StreamSpec(name=subjects.USAGE_STREAM, subjects=(subjects.USAGE_ALL,), max_age=30 * 86400.0)
# The audit log: kept until an operator's limit removes it.
AUDIT = StreamSpec(name=subjects.AUDIT_STREAM, subjects=(subjects.AUDIT_ALL,))
# Workers' reports of jobs whose gateway was gone, until a gateway turns each into its usage
# record (work-queue retention: a report leaves once handled). One per job (message id and
# subject = job id); kept a week, so a deployment whose every gateway was down still bills them.
ORPHANS = StreamSpec(
    name=subjects.ORPHANS_STREAM,
    subjects=(subjects.ORPHAN_ALL,),
    retention="workqueue",
    max_age=7 * 86400.0,
    max_msgs=1_000_000,
    max_bytes=1 << 30,
    max_msgs_per_subject=1,
    max_msg_size=64 * 1024,
)

# --- the buckets -------------------------------------------------------------------------

KEYS = BucketSpec(subjects.KEYS_BUCKET, history=5)
ORGS = BucketSpec(subjects.ORGS_BUCKET, history=5)
# The response cache: TTL and size from the gateway's settings; oldest answers go first.
CACHE = BucketSpec(subjects.CACHE_BUCKET, ttl=3600.0, max_bytes=256 << 20, discard="old", replicated=False)
# Limit counters: an entry untouched for 40 days is gone (a month's cap needs <= 31 days).
LIMITS = BucketSpec(subjects.LIMITS_BUCKET, ttl=40 * 86400.0)
IDEMPOTENCY = BucketSpec(subjects.IDEMPOTENCY_BUCKET, ttl=86400.0)
# Responses API answers kept for `previous_response_id` and GET (store: true), per org; the
# TTL from the gateway's --responses-ttl (OpenAI keeps them 30 days).
RESPONSES = BucketSpec(subjects.RESPONSES_BUCKET, ttl=30 * 86400.0, max_bytes=1 << 30)
ROUTING = BucketSpec(subjects.ROUTING_BUCKET, history=ROUTING_HISTORY)
# Web console sessions, shared by every gateway (a console behind a load balancer keeps its
# session on any replica). The TTL is the idle timeout: a session in use is rewritten, so an
# idle one is gone after it; the gateway sets it from --console-idle.
SESSIONS = BucketSpec(subjects.SESSIONS_BUCKET, ttl=1800.0)
# The node registry (node id -> schemas.registry.NodeRecord), and enrolment tokens (token id ->
# EnrolToken: a digest, never the secret). Removed nodes stay as records: their credentials stay revoked.
NODES = BucketSpec(subjects.NODES_BUCKET, history=5)
ENROL = BucketSpec(subjects.ENROL_BUCKET, history=1)
# One entry per placement, a job at one dispatch (schemas.placements), made by compare-and-set
# before its work message is published: the one record of "placed" that every scheduler shares
# and that outlives a nats-server restart (JetStream's dedupe forgets the id of a work message
# once it is acked and removed, when the server restarts). Kept an hour: longer than a job's
# deadline (the gateway's --request-timeout, 300 s by default) and than the work queue keeps a job.
PLACEMENT_TTL = 3600.0
PLACEMENTS = BucketSpec(subjects.PLACEMENTS_BUCKET, ttl=PLACEMENT_TTL)
# Gateway secrets (`subjects.TICKET_KEY`): written once, by compare-and-set, by the first
# gateway; no role but `api` may read the bucket.
SECRETS = BucketSpec(subjects.SECRETS_BUCKET, history=1)
