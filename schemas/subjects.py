"""Every NATS subject, stream, consumer and queue-group name Tokenyard uses.

No other module writes a subject string. Model ids may hold any character (`/ . :`, spaces,
unicode), but a subject token may not hold `.`, `*`, `>` or whitespace, and a JetStream
consumer name is stricter still. `model_token` maps a model id to a token of `[A-Za-z0-9_-]`
injectively:

- ASCII letters, digits and `-` stand for themselves;
- `_` becomes `__`;
- every other character becomes `_` followed by two upper-case hex digits per UTF-8 byte.

Because `_` always starts an escape, and an escape is either `__` or `_` + two hex digits,
the token decodes back to exactly one id (`model_id_from_token`). Examples:
`meta-llama/Llama-3.1-8B` -> `meta-llama_2FLlama-3_2E1-8B`; `a_b` -> `a__b`.
"""

from __future__ import annotations

import re
import secrets

PREFIX = "ty"

# API -> scheduler (queue group: one scheduler answers each request).
SCHED_SUBMIT = f"{PREFIX}.sched.submit"
SCHED_MODELS = f"{PREFIX}.sched.models"
SCHED_PING = f"{PREFIX}.sched.ping"
SCHEDULER_QUEUE_GROUP = "schedulers"
SCHED_ALIVE_ANY = f"{PREFIX}.sched.alive.*"


def scheduler_alive(instance: str) -> str:
    """Where one scheduler process answers "alive" (`scheduler.placements`): another scheduler
    that finds a placement it claimed unfinished asks here whether it still runs."""
    return f"{PREFIX}.sched.alive.{instance}"


# Workers -> everyone who keeps a fleet view (schedulers): presence and free slots.
FLEET_HEARTBEAT_ALL = f"{PREFIX}.fleet.hb.*"
# Schedulers -> workers: "announce yourselves now" (sent on scheduler start).
FLEET_ROLL_CALL = f"{PREFIX}.fleet.rollcall"

# The durable work queue. One subject per (pool, model); one consumer per subject.
WORK_STREAM = "TY_WORK"
WORK_ALL = f"{PREFIX}.work.>"

# Usage and audit events (JetStream, deduplicated by id) and the control plane's KV buckets.
USAGE_STREAM = "TY_USAGE"
USAGE_ALL = f"{PREFIX}.usage.>"
AUDIT_STREAM = "TY_AUDIT"
AUDIT_ALL = f"{PREFIX}.audit.>"
KEYS_BUCKET = "ty_keys"  # key id -> KeyRecord
ORGS_BUCKET = "ty_orgs"  # org id -> OrgRecord
CACHE_BUCKET = "ty_cache"  # request digest -> cached answer
LIMITS_BUCKET = "ty_limits"  # counters for rate limits and quotas (scheduler)
IDEMPOTENCY_BUCKET = "ty_idem"  # Idempotency-Key -> job id
ROUTING_BUCKET = "ty_routing"  # routing policies: default, per model, per key (schemas.routing)
RESPONSES_BUCKET = "ty_responses"  # <org>.<response id> -> schemas.responses.StoredResponse (Responses API)
SESSIONS_BUCKET = "ty_sessions"  # web console sessions: digest of the session id -> schemas.console.ConsoleSession
NODES_BUCKET = "ty_nodes"  # node id -> NodeRecord: the enrolled nodes (schemas.registry)
ENROL_BUCKET = "ty_enrol"  # enrolment token id -> EnrolToken (only a digest of its secret)
PLACEMENTS_BUCKET = "ty_placed"  # <job id>.<dispatch> -> schemas.placements.Placement (scheduler)
SECRETS_BUCKET = "ty_secrets"  # what only gateways read: the key that seals job tickets
TICKET_KEY = "ticket-key"  # its entry: 32 random bytes, made by the first gateway to start

_POOL_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_ESCAPE_RE = re.compile(r"_(_|[0-9A-F]{2})")


def kv_prefix(bucket: str) -> str:
    """The subject prefix of a KV bucket's entries (`<prefix><key>`), as JetStream defines it."""
    return f"$KV.{bucket}."


# The JetStream API, for the few calls made without nats-py's JetStream context (shared
# plumbing in schemas/ and the workers' standing pull requests).
JS_API = "$JS.API"


def js_stream_create(stream: str) -> str:
    return f"{JS_API}.STREAM.CREATE.{stream}"


def js_stream_update(stream: str) -> str:
    return f"{JS_API}.STREAM.UPDATE.{stream}"


def js_stream_info(stream: str) -> str:
    return f"{JS_API}.STREAM.INFO.{stream}"


def js_consumer_info(stream: str, durable: str) -> str:
    return f"{JS_API}.CONSUMER.INFO.{stream}.{durable}"


def js_consumer_next(stream: str, durable: str) -> str:
    return f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.{durable}"


def js_ack(stream: str, durable: str) -> str:
    """Every ack subject of one consumer's deliveries (a wildcard, for permissions)."""
    return f"$JS.ACK.{stream}.{durable}.>"


def model_token(model_id: str) -> str:
    """Encode a model id as a subject token (see the module docstring)."""
    out: list[str] = []
    for ch in model_id:
        if ch in _PLAIN:
            out.append(ch)
        elif ch == "_":
            out.append("__")
        else:
            out.extend(f"_{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def model_id_from_token(token: str) -> str:
    """Invert `model_token`; raises ValueError for a string it could not have produced."""
    raw = bytearray()
    i = 0
    while i < len(token):
        ch = token[i]
        if ch in _PLAIN:
            raw.append(ord(ch))
            i += 1
            continue
        m = _ESCAPE_RE.match(token, i)
        if not m:
            raise ValueError(f"not a model token: {token!r}")
        raw.extend(b"_" if m.group(1) == "_" else bytes([int(m.group(1), 16)]))
        i = m.end()
    return raw.decode("utf-8")


def check_pool(pool: str) -> str:
    """Pool names are plain tokens: lower-case letters, digits and `-`."""
    if not _POOL_RE.match(pool):
        raise ValueError(f"pool name must match {_POOL_RE.pattern}: {pool!r}")
    return pool


def work_subject(pool: str, model_id: str) -> str:
    return f"{PREFIX}.work.{check_pool(pool)}.{model_token(model_id)}"


def parse_work_subject(subject: str) -> tuple[str, str] | None:
    """(pool, model id) of a `work_subject`, or None for any other subject."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or parts[1] != "work":
        return None
    try:
        return parts[2], model_id_from_token(parts[3])
    except ValueError:
        return None


def work_consumer(pool: str, model_id: str) -> str:
    """Durable consumer shared by every worker serving `model_id` in `pool`."""
    return f"work-{check_pool(pool)}-{model_token(model_id)}"


def fleet_heartbeat(node_id: str) -> str:
    return f"{PREFIX}.fleet.hb.{node_id}"


def reply_inbox(gateway_id: str) -> str:
    """What one gateway subscribes to for the events of all its jobs."""
    return f"{PREFIX}.reply.{gateway_id}.*"


def reply_subject(gateway_id: str, token: str) -> str:
    """Where the events of one job go: its gateway's inbox and the job's reply token, a secret
    only the job's own `Job.reply` carries (`new_reply_token`). A node that learns another job's
    id still cannot address its events: the gateway routes events by the token, never by the
    job id an event claims."""
    return f"{PREFIX}.reply.{gateway_id}.{token}"


def new_reply_token() -> str:
    """A fresh, unguessable reply token (128 random bits, as a subject token)."""
    return secrets.token_hex(16)


def reply_token(subject: str) -> str:
    """The token of a `reply_subject`."""
    return subject.rsplit(".", 1)[-1]


# The last token of a gateway's beat subject: never a reply token (those are 32 hex digits).
BEAT_TOKEN = "beat"


def reply_beat(gateway_id: str) -> str:
    """Where workers send one gateway their heartbeats for all its jobs (`schemas.beats`): on
    its event inbox, so a beat arrives in order with the events of the attempts it names."""
    return f"{PREFIX}.reply.{gateway_id}.{BEAT_TOKEN}"


def reply_gateway(subject: str) -> str:
    """The gateway id of a `reply_subject` (whose inbox a job's events go to); "" if it is none."""
    parts = subject.split(".")
    return parts[2] if len(parts) == 4 and parts[:2] == [PREFIX, "reply"] and all(parts) else ""


def node_control(node_id: str) -> str:
    """Where a gateway tells one worker to stop a job (cancel, fenced-out attempt)."""
    return f"{PREFIX}.node.{node_id}.ctl"


def usage_subject(job_id: str) -> str:
    return f"{PREFIX}.usage.{job_id}"


def audit_subject(event_id: str) -> str:
    return f"{PREFIX}.audit.{event_id}"


# A worker's report of a job whose gateway was gone (`schemas.usage.WorkerReport`): one subject
# per job, so a report is found, and deduplicated, by job id. Gateways read them with one shared
# consumer and turn each into the job's usage record (`broker_api.orphans`).
ORPHANS_STREAM = "TY_ORPHANS"
ORPHAN_ALL = f"{PREFIX}.orphan.>"
ORPHAN_ANY = f"{PREFIX}.orphan.*"
ORPHANS_CONSUMER = "gateway-orphans"  # shared by every gateway


def orphan_subject(job_id: str) -> str:
    return f"{PREFIX}.orphan.{job_id}"


# --- scheduler additions (issue 5) ---------------------------------------------------------

# The durable consumer of USAGE_STREAM that every scheduler shares: each usage record settles
# its job's limit reservations once, whichever scheduler reads it.
SETTLE_CONSUMER = "scheduler-settle"


def limits_entry(scope: str, ident: str) -> str:
    """The LIMITS_BUCKET key of one subject's counters: scope "k" (an API key) or "o" (an org)."""
    return f"{scope}.{model_token(ident)}"


# Admitted jobs the schedulers hold back until their pool has room, released fairest first
# (work-queue retention: a job leaves it once released to its work queue). One subject per
# tenant, so a per-subject cap bounds how much of the queue one tenant may hold.
INTAKE_STREAM = "TY_INTAKE"
INTAKE_ALL = f"{PREFIX}.intake.>"
RELEASE_CONSUMER = "scheduler-release"  # shared by every scheduler


def placement_key(job_id: str, dispatch: int) -> str:
    """The PLACEMENTS_BUCKET key of one placement: a job at one dispatch."""
    return f"{job_id}.{dispatch}"


def intake_subject(tenant: str) -> str:
    return f"{PREFIX}.intake.{model_token(tenant) or '_'}"


# --- permissions (issue 10): the JetStream API subjects a role may use, per stream -----------

NODE_CONTROL_ANY = f"{PREFIX}.node.*.ctl"
REPLY_ANY = f"{PREFIX}.reply.*.*"
SCHED_ALL = f"{PREFIX}.sched.>"
INBOX_ALL = "_INBOX.>"  # nats-py's default request inboxes (operator roles)
JS_API_INFO = f"{JS_API}.INFO"
JS_STREAM_NAMES = f"{JS_API}.STREAM.NAMES"
JS_STREAM_LIST = f"{JS_API}.STREAM.LIST"
# The system account's request that replaces an account's JWT on every server with a NATS-based
# resolver (nats-server's "full" resolver): how a revocation reaches the servers.
SYS_CLAIMS_UPDATE = "$SYS.REQ.CLAIMS.UPDATE"


def sys_claims_lookup(account: str) -> str:
    """Ask the servers' resolver for the account JWT it holds now (the system account's user)."""
    return f"$SYS.REQ.ACCOUNT.{account}.CLAIMS.LOOKUP"


def worker_inbox(pool: str, node_id: str) -> str:
    """The request-inbox prefix of one worker (nats-py `inbox_prefix`): under the pool, so an
    operator adapter may own every inbox of its pool and an enrolled node only its own. The
    first token is not `_INBOX`, so no role that reads `_INBOX.>` receives a worker's jobs."""
    return f"_INBOX_ty.{check_pool(pool)}.{node_id}"


ALL_WORKER_INBOXES = "_INBOX_ty.>"
WORK_ANY_POOL = f"{PREFIX}.work.*.*"


def pool_inboxes(pool: str) -> str:
    return f"_INBOX_ty.{check_pool(pool)}.>"


def js_stream_access(stream: str) -> tuple[str, ...]:
    """Every JetStream API subject that reads, makes or consumes one stream (and its KV
    entries, for a bucket's stream), for an operator role that owns the stream. Written with
    wildcards where the API's subjects allow (`$JS.API.<kind>.<verb>.<stream>[.<more>]`):
    a user JWT travels in every CONNECT, and nats-server refuses lines over 4 KiB by default."""
    return (
        f"{JS_API}.*.*.{stream}",  # STREAM.INFO|CREATE|UPDATE|PURGE, DIRECT.GET, CONSUMER.CREATE
        f"{JS_API}.*.*.{stream}.>",  # CONSUMER.CREATE|INFO|DELETE.<consumer>, DIRECT.GET.<subject>
        f"{JS_API}.*.*.*.{stream}.>",  # CONSUMER.MSG.NEXT.<consumer>, CONSUMER.DURABLE.CREATE.<consumer>
        f"{JS_API}.STREAM.MSG.GET.{stream}",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def js_consumer_create(stream: str, durable: str, filter_subject: str) -> str:
    """The create request that names its filter in the subject (nats-server 2.10+ refuses a
    body whose filter differs), so a permission on it allows exactly that consumer."""
    return f"{JS_API}.CONSUMER.CREATE.{stream}.{durable}.{filter_subject}"


def kv_entries(bucket: str) -> str:
    return f"{kv_prefix(bucket)}>"


# --- the ledger role (issue 14) ------------------------------------------------------------

# Gateways ask the ledgers for usage reports, exports and the audit log (schemas.ledger);
# one ledger of the queue group answers each page.
LEDGER_QUERY = f"{PREFIX}.ledger.query"
LEDGER_QUEUE_GROUP = "ledgers"


def ledger_consumer(name: str) -> str:
    """The durable consumer of USAGE_STREAM a ledger named `name` reads with. Ledgers of one
    name share it (and so must share one database); a ledger with its own copy has its own name."""
    return f"ledger-{name}"


def ledger_audit_consumer(name: str) -> str:
    """The durable consumer of AUDIT_STREAM of the ledger named `name`."""
    return f"audit-{name}"
