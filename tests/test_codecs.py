"""Every record on the wire or in a bucket: encode -> decode gives it back, and bytes that are
not such a record are a `WireError` (never a half-read object, never another exception)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from scheduler.limits import Counters
from schemas.answers import CachedAnswer
from schemas.beats import Beat, BeatAnswer, Beating
from schemas.codec import VERSION, WireError, need, pack, unpack
from schemas.events import (
    Delta,
    Done,
    Failed,
    Heartbeat,
    Piece,
    Start,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    decode_event,
)
from schemas.intake import Queued
from schemas.jobs import Admission, Job, ModelAdvert, NodeAdvert, Stop, Submission, decode_model_list, encode_model_list
from schemas.tenancy import KeyRecord, Limits, OrgRecord
from schemas.usage import AuditEvent, UsageRecord

JOB = Job(
    id="j1",
    model="org/model",
    request={"model": "org/model", "messages": [{"role": "user", "content": "hi"}]},
    reply="ty.reply.g.j1",
    deadline=1.7e9,
    dispatch=2,
    streamed=False,
)
LIMITS = Limits(rpm=10, tpm=1000, usd_per_day=2.5, max_tokens=64)
PIECE = Piece(
    0,
    "hel",
    2,
    (ToolCallDelta(0, "call_1", "lookup", '{"q":'), ToolCallDelta(0, arguments='"x"}')),
    (TokenLogprob("hel", -0.1, (104, 101, 108), (TopLogprob("hel", -0.1, None), TopLogprob("he", -2.5, (104, 101)))),),
)

RECORDS: list[tuple[Any, Callable[[bytes], Any]]] = [
    (JOB, Job.decode),
    (
        Submission(
            job=JOB,
            tenant="org_1",
            key_id="k1",
            priority="batch",
            avoid=("pool-a",),
            key_limits=LIMITS,
            org_limits=Limits(tokens_per_month=9),
            estimated_tokens=77,
            volunteer_ok=True,
        ),
        Submission.decode,
    ),
    (Admission(pool="own", live_workers=3, model="m2", lane_credits=4, lane_ttl=1.5), Admission.decode),
    (Admission(error={"kind": "contention", "status": 503, "message": "busy"}), Admission.decode),
    (Stop("j1", 2001, "client gone"), Stop.decode),
    (
        NodeAdvert(
            node="n1",
            pool="own",
            models=(ModelAdvert("m", 4096, "me", 0.5, 1.5),),
            slots_total=8,
            slots_free=3,
            draining=True,
            interval=0.5,
            started=1.7e9,
            kind="cloud",
            healthy=False,
            health_since=1.7e9 + 5,
        ),
        NodeAdvert.decode,
    ),
    (Start("j1", 1001, 0, "n1"), decode_event),
    (Delta("j1", 1001, 1, "n1", (PIECE, Piece(1, " there", 1))), decode_event),
    (Done("j1", 1001, 2, "n1", ("stop", "length"), 5, 3, cached_tokens=2, cost=0.001, pieces=(PIECE,)), decode_event),
    (Done("j1", 1001, 2, "n1", ("cancelled",), 5, 3), decode_event),
    (Failed("j1", 1001, 3, "n1", {"kind": "worker_failed", "status": 502, "message": "boom"}, True), decode_event),
    (Heartbeat("j1", 1001, 4, "n1"), decode_event),
    (
        UsageRecord(
            "j1", 1.7e9, "o", "p", "k", "m", "own", "n1", 2, 5, 3, 0, 0.25, 12.5, 40.0, "cancelled", 200, True, 9
        ),
        UsageRecord.decode,
    ),
    (
        AuditEvent("e1", 1.7e9, "o", "admin", "key.create", "k1", "127.0.0.1", {"name": "x", "n": [1, 2]}),
        AuditEvent.decode,
    ),
    (
        KeyRecord(
            "k1", "o", "name", "ab" * 32, 1.7e9, "web", True, ("m1", "m2"), LIMITS, "interactive", 2e9, 0.0, False, True
        ),
        KeyRecord.decode,
    ),
    (OrgRecord("o", "Acme", 1.7e9, LIMITS, ("web", "batch")), OrgRecord.decode),
    (Queued(JOB, "own", "org_1", "standard", 1.7e9), Queued.decode),
    (CachedAnswer(["a", "b"], ["stop", "length"], 5, 4, 0.01), CachedAnswer.decode),
    (
        Counters(
            ((1_700_000_000, 2), (1_700_000_001, 1)),
            ((1_700_000_000, 300),),
            19000,
            10,
            0.5,
            24300,
            99,
            1.25,
            {"j1": [10, 0.0, 1.7e9, 1_700_000_000, 1_700_000_000, 19000, 64]},
        ),
        Counters.decode,
    ),
    (Beat("n1", (Beating("ab" * 16, 1001, 4), Beating("cd" * 16, 2000, 0))), Beat.decode),
    (BeatAnswer((1, 3)), BeatAnswer.decode),
]
DECODERS = sorted({decode for _, decode in RECORDS}, key=lambda d: d.__qualname__)


@pytest.mark.parametrize(("record", "decode"), RECORDS, ids=lambda x: type(x).__name__ if not callable(x) else "")
def test_every_record_round_trips(record: Any, decode: Callable[[bytes], Any]) -> None:
    assert decode(record.encode()) == record


def test_limits_and_model_lists_round_trip() -> None:
    assert Limits.from_dict(LIMITS.to_dict()) == LIMITS and Limits.from_dict(None) == Limits()
    models = [ModelAdvert("a"), ModelAdvert("b/c", 8192, "x", 1.0, 2.0)]
    assert decode_model_list(encode_model_list(models)) == models


GARBAGE = [
    b"",
    b"\xc1",  # never valid msgpack
    b"not msgpack at all \xff\xfe",
    msgpack.packb([1, 2, 3]),  # not a map
    msgpack.packb("a string"),
    msgpack.packb({"v": VERSION + 1, "id": "x"}),  # a version this code does not read
    msgpack.packb({"id": "x"}),  # no version at all
    pack({}),  # a record with nothing in it
]
ALL_OPTIONAL = {Admission.decode, Counters.decode}  # an empty map is a valid one of these


@pytest.mark.parametrize("decode", DECODERS, ids=lambda d: d.__qualname__)
@pytest.mark.parametrize("data", GARBAGE)
def test_garbage_is_a_wire_error(decode: Callable[[bytes], Any], data: bytes) -> None:
    if data == pack({}) and decode in ALL_OPTIONAL:
        assert decode(data) == type(decode(data))()
        return
    with pytest.raises(WireError):
        decode(data)


@pytest.mark.parametrize(
    "fields",
    [
        {"k": "delta", "j": "j", "a": 1, "s": 0, "p": [[0, 5, 1]]},  # text is not a string
        {"k": "delta", "j": "j", "a": "1", "s": 0},  # attempt is not an int
        {"k": "delta", "j": "j", "a": True, "s": 0},  # a bool is not an int here
        {"k": "delta", "j": "j", "a": 1, "s": 0, "p": [[0, "x"]]},  # a piece too short
        {"k": "done", "j": "j", "a": 1, "s": 0, "f": ["maybe"]},  # no such finish reason
        {"k": "failed", "j": "j", "a": 1, "s": 0, "e": "boom"},  # an error that is not a map
        {"k": "wat", "j": "j", "a": 1, "s": 0},
    ],
)
def test_malformed_events_are_wire_errors(fields: dict[str, Any]) -> None:
    with pytest.raises(WireError):
        decode_event(pack(fields))


def test_records_read_tolerantly_and_refuse_bad_values() -> None:
    newer = unpack(JOB.encode()) | {"added_later": [1, 2]}
    assert Job.decode(pack({k: v for k, v in newer.items() if k != "v"})) == JOB  # unknown keys ignored
    older = {k: v for k, v in unpack(JOB.encode()).items() if k not in ("v", "st", "bt")}
    assert Job.decode(pack(older)).streamed  # an older gateway's job: its first delta goes at once, as before
    assert JOB.beats and not Job.decode(pack(older)).beats  # ... and it gets a heartbeat request per job
    with pytest.raises(WireError):
        Beat.decode(pack({"n": "n1", "b": [["tok", True, 0]]}))  # an attempt is an integer
    with pytest.raises(WireError):
        BeatAnswer.decode(pack({"stop": ["0"]}))
    with pytest.raises(WireError):
        need({}, "id")
    with pytest.raises(WireError):
        pack({"n": 1 << 70})  # beyond what msgpack holds
    with pytest.raises(WireError):
        Submission.decode(pack({"job": JOB.encode(), "prio": "urgent"}))  # no such tier
    with pytest.raises(WireError):
        KeyRecord.decode(pack({"id": "k", "org": "o", "name": "n", "digest": "d", "created": 0, "priority": "vip"}))
    with pytest.raises(WireError):
        UsageRecord.decode(pack({**unpack(RECORDS[12][0].encode()), "outcome": "maybe"}))
    with pytest.raises(WireError):
        Counters.decode(pack({"rpmw": ["fast", 1]}))
    with pytest.raises(WireError):
        NodeAdvert.decode(pack({"node": "n", "pool": "p", "models": [["m", "many"]]}))
