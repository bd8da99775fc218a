"""A node cannot put another node's id (and its owner's price) on its work: an enrolled node's
claim must be signed with its own NATS key, checked by the gateway against the registry.

Real nats-server with JWT auth, real scheduler and gateway; the rogue is a NATS client holding
an enrolled node's own credentials, doing what a modified worker would."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import openai
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from broker_api.attribution import UNVERIFIED, verifies, verify_key
from broker_api.nats_auth import write_secret
from broker_api.nats_jwt import ACCOUNT, USER, Key, creds
from schemas import subjects
from schemas.codec import WireError
from schemas.errors import WorkerFailedError
from schemas.events import Done, Failed, Piece, claim_message, decode_event
from schemas.jobs import Job, ModelAdvert, NodeAdvert, Submission
from tests.enrol import admin, create_token, creds_file, raw_join
from tests.helpers import ECHO
from tests.stack import Stack
from tests.test_nodes import eventually, sdk
from worker.identity import Signer

LAB = "lab"


async def _serve_one(
    rogue: NATS, js: JetStreamContext, *, me: str, claimed: str, signer: Signer | None, text: str
) -> str:
    """Pull the next lab job, as the node `me`, and answer it claiming to be `claimed`, with
    `signer`'s proof (None: no proof). Returns the job's id."""
    psub = await js.pull_subscribe(
        subjects.work_subject(LAB, ECHO), durable=subjects.work_consumer(LAB, ECHO), stream=subjects.WORK_STREAM
    )
    advert = NodeAdvert(me, LAB, (ModelAdvert(ECHO),), 4, 4, kind="own", interval=0.2)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        await rogue.publish(subjects.fleet_heartbeat(me), advert.encode())
        try:
            [msg] = await psub.fetch(1, timeout=0.2)
        except TimeoutError:
            continue
        job = Job.decode(msg.data)
        attempt = job.attempt_id(msg.metadata.num_delivered)
        proof = signer.prove(job.id, attempt, claimed) if signer is not None else b""
        done = Done(
            job.id,
            attempt,
            0,
            claimed,
            finish=("stop",),
            prompt_tokens=3,
            completion_tokens=2,
            pieces=(Piece(0, text, 2),),
            proof=proof,
        )
        await rogue.publish(job.reply, done.encode())
        await msg.ack()
        await psub.unsubscribe()
        return job.id
    raise AssertionError("no lab job reached the node")


async def _ask(stack: Stack, client: Any, jobs: asyncio.Task[str]) -> tuple[str, str]:
    # the rogue node's adverts have only just started: asked before the gateway heard one, the
    # model does not exist yet (a 404 seen under load)
    await stack.wait_for_model(ECHO)
    answer = await client.chat.completions.create(
        model=ECHO, messages=[{"role": "user", "content": "hello"}], extra_body={"provider": {"only": [LAB]}}
    )
    job_id = await jobs
    assert answer.id.removeprefix("chatcmpl-") == job_id
    return job_id, answer.choices[0].message.content


async def test_a_node_cannot_bill_its_work_as_another_node(stack: Stack) -> None:
    await stack.start_api()
    await stack.wait_for_scheduler()
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http, sdk(stack.api_url) as client:
        token = await create_token(http, pool=LAB, models=[ECHO], uses=2)
        victim = await raw_join(http, token["token"], [ECHO])
        joined = await raw_join(http, token["token"], [ECHO])
        for node, price in ((victim["node_id"], 40.0), (joined["node_id"], 1.0)):
            r = await admin(http, "PATCH", f"/nodes/{node}", json={"price": {"input": price, "output": price}})
            assert r.status_code == 200, r.text
        me, other = joined["node_id"], victim["node_id"]
        path = creds_file(stack, joined)
        signer = Signer.from_creds(path)
        rogue = await nats.connect(stack.nats_url, user_credentials=path, inbox_prefix=subjects.worker_inbox(LAB, me))
        js = rogue.jetstream()
        try:
            # claiming the other node: with no proof, then with a proof signed by its own key
            forged: list[str] = []
            for proof_by in (None, signer):
                serving = asyncio.create_task(_serve_one(rogue, js, me=me, claimed=other, signer=proof_by, text="x"))
                job_id, text = await _ask(stack, client, serving)
                assert text == "x"  # the answer is relayed: only its attribution is refused
                forged.append(job_id)
            # its own id, with its own proof: its owner is credited at its price
            serving = asyncio.create_task(_serve_one(rogue, js, me=me, claimed=me, signer=signer, text="mine"))
            honest, _ = await _ask(stack, client, serving)
        finally:
            await rogue.close()

        async def rows() -> dict[str, dict[str, Any]] | None:
            data = (await admin(http, "GET", "/usage/export", params={"format": "json"})).json()["data"]
            found = {u["job_id"]: u for u in data}
            return found if all(j in found for j in (*forged, honest)) else None

        usage = await eventually(rows)
        for job_id in forged:
            assert usage[job_id]["node"] == UNVERIFIED, usage[job_id]
            assert usage[job_id]["cost"] == 0.0  # never the claimed owner's price
        assert usage[honest]["node"] == me
        assert usage[honest]["cost"] == pytest.approx(5 * 1.0 / 1e6)
        assert other not in {u["node"] for u in usage.values()}

        async def flagged() -> list[dict[str, Any]] | None:
            audit = (await admin(http, "GET", "/audit")).json()["data"]
            found = [e for e in audit if e["action"] == "node.unverified" and e["target"] == other]
            return found if len(found) == 2 else None

        events = await eventually(flagged)
        assert {e["detail"]["flaw"] for e in events} == {"no proof", "the proof does not verify"}
        assert {e["org"] for e in events} == {victim["org"]}  # the claimed node's owner sees it
        assert {e["detail"]["job_id"] for e in events} == set(forged)


def test_a_proof_verifies_only_against_the_signers_user_key(tmp_path: Path) -> None:
    mine, theirs = Key.new(USER), Key.new(USER)
    path = tmp_path / "node.creds"
    write_secret(path, creds("jwt", mine.seed))
    proof = Signer.from_creds(str(path)).prove("j1", 1001, "nd-a")
    assert len(proof) == 64
    assert verifies(verify_key(mine.public), claim_message("j1", 1001, "nd-a"), proof)
    for wrong in (
        claim_message("j1", 1002, "nd-a"),
        claim_message("j2", 1001, "nd-a"),
        claim_message("j1", 1001, "nd-b"),
    ):
        assert not verifies(verify_key(mine.public), wrong, proof)
    assert not verifies(verify_key(theirs.public), claim_message("j1", 1001, "nd-a"), proof)
    corrupt = mine.public[:-1] + ("A" if mine.public[-1] != "A" else "B")
    for bad in (Key.new(ACCOUNT).public, corrupt, "", "not base32!"):
        assert verify_key(bad) is None
    assert Signer.from_creds("").prove("j1", 1001, "nd-a") == b""  # no credentials: nothing to sign with
    event = decode_event(Done("j1", 1001, 0, "nd-a", ("stop",), 1, 1, proof=proof).encode())
    assert isinstance(event, Done) and event.proof == proof
    with pytest.raises(WireError, match="proof"):
        decode_event(Done("j1", 1001, 0, "nd-a", ("stop",), 1, 1, proof=b"short").encode())


async def _fail_all(
    rogue: NATS, js: JetStreamContext, *, me: str, claim: list[tuple[str, Signer | None]], failed: dict[str, int]
) -> None:
    """Advertise as the lab node `me` and fail (retryable) every lab job pulled, each claiming
    `claim[-1]`'s node with its signer's proof (None: no proof); `failed`: job id -> the index
    of the claim its first attempt made. Runs until cancelled."""
    psub = await js.pull_subscribe(
        subjects.work_subject(LAB, ECHO), durable=subjects.work_consumer(LAB, ECHO), stream=subjects.WORK_STREAM
    )
    advert = NodeAdvert(me, LAB, (ModelAdvert(ECHO),), 4, 4, kind="own", interval=0.2)
    while True:
        await rogue.publish(subjects.fleet_heartbeat(me), advert.encode())
        try:
            msgs = await psub.fetch(4, timeout=0.2)
        except TimeoutError:
            continue
        for msg in msgs:
            job = Job.decode(msg.data)
            attempt = job.attempt_id(msg.metadata.num_delivered)
            claimed, signer = claim[-1]
            failed.setdefault(job.id, len(claim) - 1)
            proof = signer.prove(job.id, attempt, claimed) if signer is not None else b""
            error = WorkerFailedError("the node failed").to_wire()
            await rogue.publish(job.reply, Failed(job.id, attempt, 0, claimed, error, True, proof=proof).encode())
            await msg.term()


async def test_a_failure_is_counted_against_the_node_its_claim_proves_never_a_claimed_one(stack: Stack) -> None:
    """The node a re-dispatch names as the failed one (the scheduler counts it against that
    node's health at once) is the attempt's checked claim: a node failing jobs under a sibling's
    id names nobody, and one failing under its own proven id names itself."""
    await stack.start_api(max_dispatches=2)
    await stack.wait_for_scheduler()
    watcher = await stack.connect()
    redispatched: dict[str, Submission] = {}

    async def seen(msg: Any) -> None:
        with contextlib.suppress(WireError):
            sub = Submission.decode(msg.data)
            if sub.job.dispatch > 1:
                redispatched.setdefault(sub.job.id, sub)

    await watcher.subscribe(subjects.SCHED_SUBMIT, cb=seen)
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http, sdk(stack.api_url) as client:
        token = await create_token(http, pool=LAB, models=[ECHO], uses=2)
        victim = await raw_join(http, token["token"], [ECHO])
        joined = await raw_join(http, token["token"], [ECHO])
        me, other = joined["node_id"], victim["node_id"]
        path = creds_file(stack, joined)
        signer = Signer.from_creds(path)
        rogue = await nats.connect(stack.nats_url, user_credentials=path, inbox_prefix=subjects.worker_inbox(LAB, me))
        cases = [(other, None, ""), (other, signer, ""), (me, signer, me)]  # claimed, proven by, the node named
        claim: list[tuple[str, Signer | None]] = []
        failed: dict[str, int] = {}
        failing = asyncio.create_task(_fail_all(rogue, rogue.jetstream(), me=me, claim=claim, failed=failed))
        try:
            for claimed, proof_by, _ in cases:
                claim.append((claimed, proof_by))
                with pytest.raises(openai.APIError):  # each attempt failed: the answer is an error
                    await client.chat.completions.create(
                        model=ECHO,
                        messages=[{"role": "user", "content": "hello"}],
                        extra_body={"provider": {"only": [LAB]}},
                    )
        finally:
            failing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await failing
            await rogue.close()

        async def all_seen() -> dict[str, Submission] | None:
            return redispatched if len(failed) == len(cases) and set(failed) <= set(redispatched) else None

        await eventually(all_seen)
    await watcher.close()
    assert {job: redispatched[job].failed_node for job in failed} == {job: cases[i][2] for job, i in failed.items()}
    assert {redispatched[job].failed_pool for job in failed} == {LAB}
