"""What each worker node may do on NATS: the least that lets it serve its models.

A node may pull jobs only from the consumers of the models it serves in its pool, ack them,
send events to gateways' reply subjects, advertise itself under its own id, and hear its own
control subject. It may not read any work queue, any reply subject, KV bucket or the
JetStream API beyond its own consumers, nor speak as another node. Its request inbox is its
own (`_INBOX_<node>`), so it cannot listen to other clients' replies either.

`worker_permissions` returns the `permissions` block of a nats-server user entry; the worker
must then connect with `inbox_prefix=worker_inbox(node)` (it does).
"""

from __future__ import annotations

from schemas import subjects


def worker_inbox(node_id: str) -> str:
    return f"_INBOX_{node_id}"


def worker_permissions(node_id: str, pool: str, models: list[str]) -> dict[str, dict[str, list[str]]]:
    stream = subjects.WORK_STREAM
    publish = [subjects.fleet_heartbeat(node_id), subjects.reply_subject("*", "*")]
    for model in models:
        durable = subjects.work_consumer(pool, model)
        publish += [
            subjects.js_consumer_info(stream, durable),
            subjects.js_consumer_next(stream, durable),
            subjects.js_ack(stream, durable),
        ]
    subscribe = [f"{worker_inbox(node_id)}.>", subjects.node_control(node_id), subjects.FLEET_ROLL_CALL]
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}}


def nats_user_block(user: str, password: str, permissions: dict[str, dict[str, list[str]]]) -> str:
    """A user entry for a nats-server config file (`authorization { users = [ ... ] }`)."""

    def quoted(items: list[str]) -> str:
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"

    pub, sub = permissions["publish"]["allow"], permissions["subscribe"]["allow"]
    return (
        f'{{ user: "{user}", password: "{password}", permissions: {{ '
        f"publish: {{ allow: {quoted(pub)} }}, subscribe: {{ allow: {quoted(sub)} }} }} }}"
    )
