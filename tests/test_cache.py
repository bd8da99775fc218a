"""The response cache (`broker_api.cache`): which requests may be answered from it, the key that
names an answer, and the bucket itself on a real nats-server."""

from __future__ import annotations

from pathlib import Path

import nats

from broker_api.cache import ResponseCache, cache_key, cacheable
from broker_api.embedded_nats import NatsServer
from schemas import subjects
from schemas.answers import CachedAnswer

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def test_only_deterministic_requests_are_cacheable() -> None:
    assert cacheable(BASE)
    assert cacheable({**BASE, "temperature": 0.7, "seed": 0})  # a fixed seed is deterministic too
    assert not cacheable({**BASE, "temperature": 0.7})
    assert not cacheable({k: v for k, v in BASE.items() if k != "temperature"})  # the default samples


def test_the_key_names_what_changes_the_answer_and_nothing_else() -> None:
    key = cache_key(BASE)
    assert len(key) == 64 and int(key, 16) >= 0  # a SHA-256, hex
    # field order, streaming, the caller's tags and usage options do not change the answer
    reordered = dict(reversed(list(BASE.items())))
    extras = {"stream": True, "stream_options": {"include_usage": True}, "user": "u1", "metadata": {"a": "b"}}
    assert cache_key(reordered) == cache_key({**BASE, **extras, "usage": {"include": True}}) == key
    assert cache_key({**BASE, "n": 1}) == key  # n=1 is the default
    # everything else does
    for change in (
        {"model": "other"},
        {"messages": [{"role": "user", "content": "hi!"}]},
        {"max_tokens": 5},
        {"n": 2},
        {"seed": 1},
        {"stop": ["x"]},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
    ):
        assert cache_key({**BASE, **change}) != key, change


async def test_answers_are_shared_through_the_bucket(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        cache = await ResponseCache.open(nc, js, ttl=60, max_bytes=1 << 20, replicas=None)
        answer = CachedAnswer(["hello"], ["stop"], 3, 1, 0.002)
        assert await cache.get(cache_key(BASE)) is None
        await cache.put(cache_key(BASE), answer)
        other = await ResponseCache.open(nc, js, ttl=60, max_bytes=1 << 20, replicas=None)  # another gateway
        assert await other.get(cache_key(BASE)) == answer
        kv = await js.key_value(subjects.CACHE_BUCKET)
        await kv.put("unreadable", b"\xc1")  # written by some other version: answered afresh
        assert await cache.get("unreadable") is None
    finally:
        await nc.close()
        server.stop()
