"""Constrained decoding and logprobs on the engine: json_object and json_schema (strict) outputs
that always parse and validate (a real validator), constrained and free rows in one batch, and
logprobs that are the model's real log probabilities. Tiny in-code model, plus SmolLM2 once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from schemas.errors import InvalidRequestError
from schemas.events import Piece
from tests.tiny_model import build
from worker.backend import Finish, Usage
from worker.engine import TransformersBackend
from worker.settings import WorkerSettings

TINY = "tiny"
# Bounded in length, so even a random model's answer ends well within max_tokens.
BOUNDED = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "tag": {"type": "string", "maxLength": 4},
        "more": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    },
    "required": ["ok", "n", "color", "tag", "more"],
    "additionalProperties": False,
}


def _schema_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


def _request(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
async def tiny() -> AsyncIterator[TransformersBackend]:
    model, tokenizer = build()
    backend = TransformersBackend.from_model(model, tokenizer, model_id=TINY, slots=8, repetition_penalty=1.0)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def _collect(backend: TransformersBackend, request: dict[str, Any], model: str = TINY) -> list[Any]:
    return await asyncio.wait_for(_items(backend, request, model), 60)


async def _items(backend: TransformersBackend, request: dict[str, Any], model: str) -> list[Any]:
    return [item async for item in backend.generate(model, request)]


def _texts(items: list[Any]) -> dict[int, str]:
    out: dict[int, str] = {}
    for i in items:
        if isinstance(i, Piece):
            out[i.index] = out.get(i.index, "") + i.text
    return out


def _finishes(items: list[Any]) -> dict[int, str]:
    return {i.index: i.reason for i in items if isinstance(i, Finish)}


async def test_json_schema_strict_always_validates(tiny: TransformersBackend) -> None:
    req = _request(response_format=_schema_format(BOUNDED), max_tokens=200, temperature=1.0, seed=3, n=4)
    items = await _collect(tiny, req)
    assert _finishes(items) == {i: "stop" for i in range(4)}
    for text in _texts(items).values():
        jsonschema.validate(json.loads(text), BOUNDED)
    assert len(set(_texts(items).values())) > 1  # sampled, not one forced answer


async def test_constrained_and_free_rows_share_a_batch(tiny: TransformersBackend) -> None:
    """Different grammars (and none) in one batch: each row follows its own, and the free row
    is exactly what it is alone."""
    other = {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 100, "maximum": 999}, "flag": {"const": True}},
        "required": ["id", "flag"],
        "additionalProperties": False,
    }
    free = _request("free text", max_tokens=30, temperature=0)
    solo = _texts(await _collect(tiny, free))[0]
    reqs = [
        _request("a", response_format=_schema_format(BOUNDED), max_tokens=200, temperature=0.8, seed=1, n=2),
        _request("b", response_format=_schema_format(other), max_tokens=200, temperature=0.8, seed=2),
        free,
    ]
    a, b, c = await asyncio.wait_for(asyncio.gather(*(_items(tiny, r, TINY) for r in reqs)), 90)
    for text in _texts(a).values():
        jsonschema.validate(json.loads(text), BOUNDED)
    jsonschema.validate(json.loads(_texts(b)[0]), other)
    assert _texts(c)[0] == solo


async def test_bad_schemas_are_400s(tiny: TransformersBackend) -> None:
    with pytest.raises(InvalidRequestError) as e:
        tiny.check(TINY, _request(response_format=_schema_format({"type": "bogus"})))
    assert e.value.param == "response_format" and "bogus" in e.value.message
    with pytest.raises(InvalidRequestError):
        tiny.check(TINY, _request(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}))
    tiny.check(TINY, _request(response_format={"type": "json_object"}))


async def test_logprobs_are_the_models_own(tiny: TransformersBackend) -> None:
    req = _request("hi there", max_tokens=12, temperature=0, logprobs=True, top_logprobs=5)
    items = await _collect(tiny, req)
    pieces = [i for i in items if isinstance(i, Piece)]
    logprobs = [lp for p in pieces for lp in p.logprobs]
    usage = items[-1]
    assert isinstance(usage, Usage) and len(logprobs) == usage.completion_tokens == 12
    assert all(p.tokens == len(p.logprobs) for p in pieces)
    # The reference: one forward pass over prompt + answer, log-softmax at each position.
    loaded = tiny._loaded
    assert loaded is not None
    prompt = tiny._prompt(req)
    by_bytes = {tiny._describe(i)[1]: i for i in range(len(loaded.tokenizer))}  # one token per byte
    answer = [by_bytes[bytes(lp.bytes or ())] for lp in logprobs]
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    reference = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)], dim=-1)
    for position, (lp, token) in enumerate(zip(logprobs, answer)):
        assert lp.logprob <= 0 and len(lp.top) == 5
        assert [t.logprob for t in lp.top] == sorted((t.logprob for t in lp.top), reverse=True)
        assert lp.top[0].logprob == pytest.approx(lp.logprob)  # greedy: the top token was chosen
        assert lp.logprob == pytest.approx(float(reference[position, token]), abs=1e-3)
        assert lp.token == bytes(lp.bytes or ()).decode("utf-8", errors="replace")


async def test_sampled_logprobs_follow_the_temperature_and_cost_nothing_unasked(tiny: TransformersBackend) -> None:
    items = await _collect(tiny, _request(max_tokens=20, temperature=1.5, seed=5, logprobs=True, top_logprobs=3))
    logprobs = [lp for i in items if isinstance(i, Piece) for lp in i.logprobs]
    assert logprobs and all(
        lp.logprob <= 0 and sum(2.718281828**t.logprob for t in lp.top) <= 1.0001 for lp in logprobs
    )
    plain = await _collect(tiny, _request(max_tokens=5, logprobs=False))
    assert not any(i.logprobs for i in plain if isinstance(i, Piece))
    only = await _collect(tiny, _request(max_tokens=5, logprobs=True))
    assert all(not lp.top for i in only if isinstance(i, Piece) for lp in i.logprobs)


async def test_smollm2_json_outputs_parse_and_validate(smol_data_dir: Path) -> None:
    from worker.smollm import MODEL_ID

    person = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
        "required": ["name", "age", "city"],
        "additionalProperties": False,
    }
    settings = WorkerSettings.from_args(["--data-dir", str(smol_data_dir), "--slots", "4"])
    backend = TransformersBackend.from_settings(settings)
    await asyncio.wait_for(backend.start(), 300)
    try:

        def ask(content: str, fmt: dict[str, Any]) -> dict[str, Any]:
            messages = [{"role": "user", "content": content}]
            return {"model": MODEL_ID, "messages": messages, "response_format": fmt, "max_tokens": 80, "temperature": 0}

        reqs = [
            ask("Describe a person called Ada who lives in London, as JSON.", _schema_format(person)),
            ask("Give the capital of France as a JSON object.", {"type": "json_object"}),
        ]
        results = await asyncio.wait_for(asyncio.gather(*(_items(backend, r, MODEL_ID) for r in reqs)), 240)
        first, second = (_texts(r)[0] for r in results)
        jsonschema.validate(json.loads(first), person)
        assert isinstance(json.loads(second), dict)
        assert [_finishes(r)[0] for r in results] == ["stop", "stop"]
    finally:
        await backend.close()
