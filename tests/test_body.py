"""broker_api.body.parse_json: what a body may hold, as pure decoding (no server)."""

from __future__ import annotations

import json

import pytest

from broker_api.body import MAX_DEPTH, parse_json
from schemas.errors import InvalidRequestError
from schemas.jobs import Job


def _refused(raw: str | bytes) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as e:
        parse_json(raw.encode() if isinstance(raw, str) else raw)
    return e.value


def test_ordinary_bodies_decode_as_json_does() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "héllo \u2603 \U0001f600"}], "seed": -(1 << 63)}
    raw = json.dumps(body).encode()
    assert parse_json(raw) == body
    assert parse_json(json.dumps(body, ensure_ascii=False).encode()) == body
    assert parse_json(b'{"max": 18446744073709551615, "f": 1.5e300, "t": true, "n": null}')["max"] == (1 << 64) - 1
    nested = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert parse_json(nested.encode()) is not None
    assert parse_json(b'{"a": 1, "a": 2}') == {"a": 2}  # duplicate keys: the last wins, as in json


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('{"seed": 18446744073709551616}', "seed"),
        ('{"seed": -9223372036854775809}', "seed"),
        ('{"a": [1, 2, {"b": %s}]}' % ("7" * 30), "a[2].b"),
        ('{"a": %s}' % ("1" * 6000), "a"),  # past Python's int-string limit: still a 400 naming it
        ('{"t": NaN}', "t"),
        ('{"t": -Infinity}', "t"),
        ('{"t": 1e400}', "t"),
        ('{"messages": [{"content": "ok \\ud83d"}]}', "messages[0].content"),
        ('{"messages": [{"content": "\\udc00 after"}]}', "messages[0].content"),
        ('{"x": {"\\ud800": 1}}', "x"),
        ('{"weird key": [0, "\\udbff"]}', '["weird key"][1]'),
    ],
)
def test_values_no_later_step_could_hold_are_refused_by_path(raw: str, param: str) -> None:
    e = _refused(raw)
    assert (e.status, e.code, e.param) == (400, "invalid_value", param)


def test_a_pair_of_surrogate_escapes_is_one_character_and_fine() -> None:
    assert parse_json(b'{"c": "\\ud83d\\ude00"}') == {"c": "\U0001f600"}


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 1000, 100_000])
def test_deep_nesting_is_refused(depth: int) -> None:
    e = _refused("[" * depth + "]" * depth)
    assert e.code == "invalid_json" and str(MAX_DEPTH) in e.message
    e = _refused('{"a": ' + '{"b": ' * depth + "1" + "}" * depth + "}")
    assert e.code == "invalid_json"


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": }', b"\xef\xbb\xbf{}", b'{"a": "\xff"}', "{}".encode("utf-16")])
def test_what_is_not_json_in_utf8_is_invalid_json(raw: bytes) -> None:
    assert _refused(raw).code == "invalid_json"


def test_whatever_it_accepts_the_job_envelope_carries() -> None:
    """The point of the checks: a decoded body always packs (a msgpack failure was a 500)."""
    for raw in [
        b'{"seed": 18446744073709551615, "neg": -9223372036854775808}',
        b'{"c": "\\ud83d\\ude00", "k": {"\\u00e9": [[[[1.0]]]]}}',
        ("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)).encode(),
    ]:
        Job("j", "m", {"x": parse_json(raw)}, "r", 0.0).encode()
