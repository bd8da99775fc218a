"""What each role may do on NATS: the least that lets it do its job, as pure data.

Every identity Tokenyard issues (`broker_api.nats_auth`) carries one of these lists in its
user JWT; the server enforces them. Roles:

- `api`: the gateway, which also keeps the ledger (`--ledger`): submits to schedulers, places
  lane jobs on work queues, hears its jobs' events and every node's advert, stops attempts, and
  owns the control plane's buckets and the usage and audit streams.
- `scheduler`: answers submissions, owns the work and intake queues and the limit counters,
  reads routing policies and the node registry, settles usage.
- `ledger`: reads the usage and audit streams into its database and answers the gateways'
  report queries (a gateway with `--ledger` has this inside `api`).
- `adapter(pool, models)`: an operator's cloud adapter: serves the work queues of its pool,
  advertises under any node id, and may create, read, pull from and ack exactly its models'
  consumers of that pool (the models its provider file maps: `tokenyard up --providers`,
  `tokenyard auth init --providers` or `--adapter NAME=MODEL,...`), as a node may; none named,
  none at all. A consumer's name is one subject token (`work-<pool>-<model>`), which a NATS
  permission cannot match by prefix, so a wildcard over consumer names would reach every
  pool's consumers, enrolled nodes' included: no pool is granted so. `adapter(None)` is
  `tokenyard up`'s own worker on the operator's machine, which serves every pool by design.
- `node(node, pool, models)`: an enrolled node, the one identity given to machines the
  operator does not run. It may create, read and pull only the consumers of the models it was
  enrolled for in its pool, ack its own deliveries, send events to gateways' reply subjects,
  report a job whose gateway is gone (`schemas.usage.WorkerReport`: the report is billed only
  through a gateway that opens its sealed ticket), advertise itself under its own id, and hear
  its own control subject and the roll call. It may not read any other queue, any reply
  subject, KV bucket or the JetStream API beyond its own consumers, nor advertise as another
  node. Its request inbox is its own (`subjects.worker_inbox`), so it cannot listen to other
  clients' replies either. The events it sends may name any node id (a subject cannot check a
  payload), so the gateway believes a node id only when the node signed it with this
  identity's key (`broker_api.attribution`).

An empty allow list denies everything in that direction.
"""

from __future__ import annotations

from dataclasses import dataclass

from schemas import subjects


@dataclass(frozen=True, slots=True)
class Permissions:
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    responses: bool = False  # may answer requests it receives (one reply each), whatever their inbox


def _streams(*names: str) -> tuple[str, ...]:
    return tuple(s for name in names for s in subjects.js_stream_access(name))


def _buckets(*buckets: str) -> tuple[str, ...]:
    out: list[str] = []
    for bucket in buckets:
        out += [*subjects.js_stream_access(f"KV_{bucket}"), subjects.kv_entries(bucket)]
    return tuple(out)


_JS_BASICS = (subjects.JS_API_INFO, subjects.JS_STREAM_NAMES, subjects.JS_STREAM_LIST)


def ledger() -> Permissions:
    """Reads the usage and audit streams, and answers the gateways' ledger queries."""
    return Permissions(
        publish=(*_JS_BASICS, *_streams(subjects.USAGE_STREAM, subjects.AUDIT_STREAM)),
        subscribe=(subjects.LEDGER_QUERY, subjects.INBOX_ALL),
        responses=True,
    )


def api() -> Permissions:
    publish = (
        subjects.SCHED_ALL,
        subjects.NODE_CONTROL_ANY,
        subjects.WORK_ALL,  # lanes: a gateway places a granted key's next jobs itself
        subjects.USAGE_ALL,
        subjects.AUDIT_ALL,
        subjects.LEDGER_QUERY,  # usage and audit reports, answered by the ledger role
        *_JS_BASICS,
        *_streams(subjects.USAGE_STREAM, subjects.AUDIT_STREAM, subjects.WORK_STREAM, subjects.ORPHANS_STREAM),
        *_buckets(
            subjects.KEYS_BUCKET,
            subjects.ORGS_BUCKET,
            subjects.CACHE_BUCKET,
            subjects.IDEMPOTENCY_BUCKET,
            subjects.RESPONSES_BUCKET,
            subjects.ROUTING_BUCKET,
            subjects.NODES_BUCKET,
            subjects.ENROL_BUCKET,
            subjects.SESSIONS_BUCKET,
            subjects.SECRETS_BUCKET,
        ),
    )
    subscribe = (subjects.REPLY_ANY, subjects.FLEET_HEARTBEAT_ALL, subjects.INBOX_ALL)
    return Permissions(publish=publish, subscribe=subscribe, responses=True)  # answers worker heartbeats


def scheduler() -> Permissions:
    publish = (
        subjects.WORK_ALL,
        subjects.INTAKE_ALL,
        subjects.FLEET_ROLL_CALL,
        subjects.SCHED_ALIVE_ANY,  # is the scheduler that claimed a placement still running?
        *_JS_BASICS,
        *_streams(subjects.WORK_STREAM, subjects.INTAKE_STREAM, subjects.USAGE_STREAM),
        *_buckets(subjects.LIMITS_BUCKET, subjects.ROUTING_BUCKET, subjects.NODES_BUCKET, subjects.PLACEMENTS_BUCKET),
    )
    subscribe = (
        subjects.SCHED_SUBMIT,
        subjects.SCHED_MODELS,
        subjects.SCHED_PING,
        subjects.SCHED_ALIVE_ANY,
        subjects.FLEET_HEARTBEAT_ALL,
        subjects.INBOX_ALL,
    )
    return Permissions(publish=publish, subscribe=subscribe, responses=True)  # answers submissions


def adapter(pool: str | None, models: tuple[str, ...] = ()) -> Permissions:
    """`pool` None: an operator's worker for any pool (what `tokenyard up` gives the workers it
    runs on its own machine, so a cloud adapter added to a local stack needs no step).
    Otherwise the work of exactly `models` in `pool` (none: no work at all)."""
    stream = subjects.WORK_STREAM
    publish: tuple[str, ...] = (subjects.FLEET_HEARTBEAT_ALL, subjects.REPLY_ANY, subjects.ORPHAN_ANY)
    if pool:
        publish += _consumers(pool, models)
    else:
        publish += (
            subjects.js_consumer_create(stream, "*", subjects.WORK_ANY_POOL),
            subjects.js_consumer_info(stream, "*"),
            subjects.js_consumer_next(stream, "*"),
            subjects.js_ack(stream, "*"),
        )
    inboxes = subjects.pool_inboxes(pool) if pool else subjects.ALL_WORKER_INBOXES
    subscribe = (inboxes, subjects.NODE_CONTROL_ANY, subjects.FLEET_ROLL_CALL)
    return Permissions(publish=publish, subscribe=subscribe)


def _consumers(pool: str, models: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Create (filtered to its own subject), read, pull from and ack each model's consumer."""
    stream = subjects.WORK_STREAM
    out: list[str] = []
    for model in models:
        durable = subjects.work_consumer(pool, model)
        out += [
            subjects.js_consumer_create(stream, durable, subjects.work_subject(pool, model)),
            subjects.js_consumer_info(stream, durable),
            subjects.js_consumer_next(stream, durable),
            subjects.js_ack(stream, durable),
        ]
    return tuple(out)


def node(node_id: str, pool: str, models: tuple[str, ...] | list[str]) -> Permissions:
    publish = (subjects.fleet_heartbeat(node_id), subjects.REPLY_ANY, subjects.ORPHAN_ANY, *_consumers(pool, models))
    subscribe = (f"{subjects.worker_inbox(pool, node_id)}.>", subjects.node_control(node_id), subjects.FLEET_ROLL_CALL)
    return Permissions(publish=publish, subscribe=subscribe)
