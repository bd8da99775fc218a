"""Replication follows the cluster (`schemas.jetstream.ensure`), on real clusters of one, two,
three and five `nats-server` nodes: three replicas where the cluster can place them, one where it
cannot, never two; R1 streams of an older version scaled up to R3 in place (their messages
kept), also with one node down; an existing stream's replicas never lowered when following."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from broker_api.embedded_nats import NatsServer
from schemas import streams, subjects
from schemas.jetstream import ensure, open_bucket, stream_info
from tests.cluster import NatsCluster


async def settled_replicas(nc: NATS, name: str, want: int, timeout: float = 30.0) -> dict[str, Any]:
    """The stream's info once `want` replicas exist and every follower is current."""
    deadline = time.monotonic() + timeout
    while True:
        info = await stream_info(nc, name)
        assert info is not None, f"{name} does not exist"
        cluster = info.get("cluster", {})
        followers = cluster.get("replicas", [])
        if (
            info["config"]["num_replicas"] == want
            and cluster.get("leader")
            and len(followers) == want - 1
            and all(f.get("current") for f in followers)
        ):
            return info
        assert time.monotonic() < deadline, f"{name} did not settle at R{want}: {cluster}"
        await asyncio.sleep(0.2)


async def test_three_nodes_every_entry_r3_and_r1_streams_scaled_up(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path).start()
    try:
        await cluster.wait_for_jetstream()
        nc = await nats.connect(cluster.urls)
        js = nc.jetstream()
        try:
            # what an older version left: R1 audit stream and keys bucket, with records in them
            assert await ensure(nc, streams.AUDIT, replicas=1) == 1
            keys = await open_bucket(nc, js, streams.KEYS, replicas=1)
            await keys.put("k1", b"record")
            await js.publish(subjects.audit_subject("e1"), b"event")
            # the new version follows the cluster: everything R3, the old records still there
            assert await ensure(nc, streams.AUDIT) == 3
            assert await ensure(nc, streams.KEYS.stream) == 3
            for name in (streams.AUDIT.name, streams.KEYS.stream.name):
                info = await settled_replicas(nc, name, 3)
                assert info["state"]["messages"] == 1
            assert (await keys.get("k1")).value == b"record"
            # a fresh stream is R3 straight away; the cache stays R1 (see schemas/streams.py)
            assert await ensure(nc, streams.USAGE) == 3
            assert await ensure(nc, streams.CACHE.stream) == 1
            # following never lowers what is there; an explicit setting does
            assert await ensure(nc, streams.AUDIT, replicas=None) == 3
            assert await ensure(nc, streams.AUDIT, replicas=1) == 1
        finally:
            await nc.close()
    finally:
        cluster.stop()


async def test_one_node_of_three_down_still_three_replicas(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path).start()
    try:
        await cluster.wait_for_jetstream()
        nc = await nats.connect(cluster.urls[0])
        try:
            assert await ensure(nc, streams.ORGS.stream, replicas=1) == 1
            cluster.kill(2)  # SIGKILL; the meta leader may have been on it: ensure waits for a new one
            assert await ensure(nc, streams.ROUTING.stream) == 3  # created with a peer missing
            assert await ensure(nc, streams.ORGS.stream) == 3  # scaled up with a peer missing
            cluster.restart(2)
            for spec in (streams.ROUTING.stream, streams.ORGS.stream):
                await settled_replicas(nc, spec.name, 3)
        finally:
            await nc.close()
    finally:
        cluster.stop()


async def test_small_and_large_clusters(tmp_path: Path) -> None:
    single = NatsServer(tmp_path / "single").start()
    try:
        nc = await nats.connect(single.url)
        assert await ensure(nc, streams.WORK) == 1  # not clustered
        await nc.close()
    finally:
        single.stop()
    for size, want in ((2, 1), (5, 3)):  # two replicas are never chosen; three at most
        cluster = NatsCluster(tmp_path / f"c{size}", size=size).start()
        try:
            await cluster.wait_for_jetstream()
            nc = await nats.connect(cluster.urls)
            try:
                assert await ensure(nc, streams.WORK) == want, f"{size} nodes"
                assert await ensure(nc, streams.LIMITS.stream) == want, f"{size} nodes"
                await settled_replicas(nc, streams.WORK.name, want)
            finally:
                await nc.close()
        finally:
            cluster.stop()
