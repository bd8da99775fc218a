"""The worker side of raw-prompt completions and embeddings (`schemas.tasks`): the echo backend,
the transformers engine without a chat template, the embedding backend on a tiny BERT built in
code, and event batches that stay far below NATS's payload limit."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from schemas.errors import ContextLengthError, InvalidRequestError, UnsupportedError
from schemas.events import Delta, Done, Piece, ToolCallDelta, decode_event
from schemas.tasks import choices
from tests import tiny_embedder, tiny_model
from worker.backend import Finish, Output, Usage
from worker.echo import EchoBackend, echo_vector
from worker.engine import TransformersBackend
from worker.engine_embed import BATCH, EmbeddingBackend, is_embedding_model
from worker.events import EventStream

COMPLETION: dict[str, Any] = {"model": "m", "tokenyard_task": "completion", "prompt": ["one two", "three"], "n": 2}


async def collect(backend: Any, model: str, request: dict[str, Any]) -> list[Output]:
    backend.check(model, request)
    return [item async for item in backend.generate(model, request)]


def texts(items: list[Output]) -> dict[int, str]:
    out: dict[int, str] = {}
    for i in items:
        if isinstance(i, Piece):
            out[i.index] = out.get(i.index, "") + i.text
    return out


def floats(vector: bytes) -> list[float]:
    return list(struct.unpack(f"<{len(vector) // 4}f", vector))


# --- echo ---------------------------------------------------------------------------------------


def echo() -> EchoBackend:
    return EchoBackend(models=("m",), slots=4, tokens=4, rate=0, context=4096)


async def test_echo_answers_each_prompt_of_a_completion_as_choices_p_times_n_plus_j() -> None:
    items = await collect(echo(), "m", COMPLETION)
    assert choices(COMPLETION) == 4
    assert texts(items) == {
        0: "one two one two",
        1: "one two one two",
        2: "three three three three",
        3: "three three three three",
    }
    assert sorted(i.index for i in items if isinstance(i, Finish)) == [0, 1, 2, 3]
    usage = items[-1]
    assert isinstance(usage, Usage) and usage.completion_tokens == 16


async def test_echo_refuses_a_suffix() -> None:
    with pytest.raises(UnsupportedError) as e:
        echo().check("m", {**COMPLETION, "suffix": "end"})
    assert e.value.param == "suffix"


async def test_echo_embeddings_are_deterministic_unit_vectors() -> None:
    request = {"model": "m", "tokenyard_task": "embedding", "input": ["a cat", "a dog", "a cat"], "dimensions": 12}
    items = await collect(echo(), "m", request)
    vectors = {i.index: i.embedding for i in items if isinstance(i, Piece)}
    assert vectors[0] == vectors[2] == echo_vector("a cat", 12) and vectors[0] != vectors[1]
    assert math.isclose(math.fsum(v * v for v in floats(vectors[1])), 1.0, rel_tol=1e-5)
    assert items[-1] == Usage(6, 0)


# --- the transformers engine without a template -------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine() -> Any:
    model, tokenizer = tiny_model.build()
    backend = TransformersBackend.from_model(model, tokenizer, model_id="tiny", slots=4, share_prefix=False)
    await backend.start()
    yield backend, tokenizer
    await backend.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_raw_prompt_skips_the_chat_template(engine: Any) -> None:
    backend, tokenizer = engine
    request = {**COMPLETION, "model": "tiny", "n": 1, "max_tokens": 3, "temperature": 0, "logprobs": True}
    items = await collect(backend, "tiny", request)
    usage = items[-1]
    assert isinstance(usage, Usage)
    # exactly the prompts' own tokens: no <|im_start|> framing around them
    assert usage.prompt_tokens == len(tokenizer("one two")["input_ids"]) + len(tokenizer("three")["input_ids"])
    assert usage.completion_tokens == 6 and sorted({i.index for i in items if isinstance(i, Finish)}) == [0, 1]
    assert all(len(i.logprobs) == i.tokens for i in items if isinstance(i, Piece) and i.tokens)
    chat = await collect(
        backend, "tiny", {"model": "tiny", "messages": [{"role": "user", "content": "three"}], "max_tokens": 1}
    )
    assert chat[-1].prompt_tokens > len(tokenizer("three")["input_ids"])  # type: ignore[union-attr]


@pytest.mark.asyncio(loop_scope="module")
async def test_the_generative_engine_refuses_embeddings_and_suffixes(engine: Any) -> None:
    backend, _ = engine
    with pytest.raises(UnsupportedError, match="embeddings"):
        backend.check("tiny", {"model": "tiny", "tokenyard_task": "embedding", "input": ["x"]})
    with pytest.raises(UnsupportedError):
        backend.check("tiny", {**COMPLETION, "model": "tiny", "suffix": "x"})
    with pytest.raises(InvalidRequestError):
        backend.check("tiny", {**COMPLETION, "model": "tiny", "prompt": [""]})


# --- the embedding backend ----------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedder() -> Any:
    model, tokenizer = tiny_embedder.build()
    backend = EmbeddingBackend.from_model(model, tokenizer, model_id="tiny-embed")
    await backend.start()
    yield backend
    await backend.close()


def embed(inputs: list[str], **extra: Any) -> dict[str, Any]:
    return {"model": "tiny-embed", "tokenyard_task": "embedding", "input": inputs, **extra}


@pytest.mark.asyncio(loop_scope="module")
async def test_embeddings_are_normalised_per_input_and_do_not_depend_on_the_batch(embedder: Any) -> None:
    inputs = [f"text number {k}" for k in range(BATCH + 3)]
    items = await collect(embedder, "tiny-embed", embed(inputs))
    vectors = {i.index: floats(i.embedding) for i in items if isinstance(i, Piece)}
    assert sorted(vectors) == list(range(len(inputs)))
    assert all(len(v) == tiny_embedder.HIDDEN for v in vectors.values())
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors.values())
    alone = await collect(embedder, "tiny-embed", embed([inputs[BATCH + 1]]))
    single = next(floats(i.embedding) for i in alone if isinstance(i, Piece))
    assert single == pytest.approx(vectors[BATCH + 1], abs=1e-5)  # padding in a batch changes nothing
    usage = items[-1]
    assert (
        isinstance(usage, Usage) and usage.prompt_tokens == sum(len(t) for t in inputs) and usage.completion_tokens == 0
    )


@pytest.mark.asyncio(loop_scope="module")
async def test_dimensions_cut_and_renormalise_and_limits_are_400s(embedder: Any) -> None:
    items = await collect(embedder, "tiny-embed", embed(["abc"], dimensions=8))
    vector = next(floats(i.embedding) for i in items if isinstance(i, Piece))
    assert len(vector) == 8 and math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)
    with pytest.raises(InvalidRequestError) as e:
        embedder.check("tiny-embed", embed(["abc"], dimensions=tiny_embedder.HIDDEN + 1))
    assert e.value.param == "dimensions"
    with pytest.raises(ContextLengthError):  # found while tokenizing, off the worker's loop, before any vector
        await collect(embedder, "tiny-embed", embed(["x" * (tiny_embedder.CONTEXT + 1)]))
    with pytest.raises(UnsupportedError, match="embeddings only"):
        embedder.check("tiny-embed", {"model": "tiny-embed", "messages": [{"role": "user", "content": "hi"}]})


def test_an_encoder_directory_is_detected_as_an_embedding_model(tmp_path: Path) -> None:
    assert is_embedding_model(tiny_embedder.save(tmp_path / "emb"))
    model, tokenizer = tiny_model.build()
    model.save_pretrained(tmp_path / "lm")
    assert not is_embedding_model(tmp_path / "lm")


# --- event batches ------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def publish(self, subject: str, payload: bytes = b"", reply: str = "", headers: Any = None) -> None:
        self.messages.append(payload)


async def test_many_vectors_go_in_several_deltas_each_far_below_the_payload_limit() -> None:
    recorder = Recorder()
    out = EventStream(recorder, "r", job_id="j", attempt=1, node="n", coalesce=60.0)
    vector = struct.pack("<3072f", *([0.5] * 3072))  # 12 KiB, as text-embedding-3-large's
    for k in range(300):
        await out.add(Piece(k, embedding=vector))
    await out.done(["stop"] * 300, Usage(300, 0))
    assert max(len(m) for m in recorder.messages) < 512 * 1024
    events = [decode_event(m) for m in recorder.messages]
    got = [p for ev in events if isinstance(ev, (Delta, Done)) for p in ev.pieces]
    assert [p.index for p in got] == list(range(300)) and all(p.embedding == vector for p in got)


async def test_text_after_a_tool_call_fragment_is_not_merged_before_it() -> None:
    recorder = Recorder()
    out = EventStream(recorder, "r", job_id="j", attempt=1, node="n", coalesce=60.0)
    call = ToolCallDelta(0, "call_1", "f", "{}")
    for piece in (Piece(0, "A", 1), Piece(0, tokens=1, tool_calls=(call,)), Piece(0, "B", 1)):
        await out.add(piece)
    await out.done(["tool_calls"], Usage(1, 3))
    got = [p for m in recorder.messages for ev in [decode_event(m)] if isinstance(ev, (Delta, Done)) for p in ev.pieces]
    order = [x for p in got for x in ([p.text] if p.text else []) + list(p.tool_calls)]
    assert order == ["A", call, "B"]  # a piece's text goes before its fragments: B may not join A
    assert len(got) == 3
