"""The transformers engine: pure pieces exhaustively, the batching loop on a tiny in-code model,
and SmolLM2 end to end (converted once per session into TOKENYARD_TEST_DATA_DIR or a tmp dir)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from schemas.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError, UnsupportedError
from schemas.events import Piece
from tests.tiny_model import CHATML_WITH_SYSTEM, build, build_tokenizer
from worker.backend import Finish, Usage
from worker.engine import TransformersBackend
from worker.engine_cache import SlabCache, merge, select
from worker.engine_sampling import apply_penalties, penalty_index, sample
from worker.engine_text import IncrementalDecoder, TextStream
from worker.settings import WorkerSettings
from worker.stops import StopScanner, partial_stop_len, split_stop

TINY = "tiny"


# -- stop strings ------------------------------------------------------------------------------


def test_split_stop_cases() -> None:
    assert split_stop("hello world", ["wor"]) == ("hello ", "", True)
    assert split_stop("hello wo", ["world"]) == ("hello ", "wo", False)
    assert split_stop("hello", ["xyz"]) == ("hello", "", False)
    assert split_stop("abcabd", ["abd", "ca"]) == ("ab", "", True)  # earliest stop wins
    assert split_stop("aaa", ["aab"]) == ("a", "aa", False)
    assert partial_stop_len("xx\n", ["\n\n", "x"]) == 1
    assert partial_stop_len("", ["abc"]) == 0


def _scan(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    scanner = StopScanner(stops)
    out = "".join(scanner.push(c) for c in chunks)
    return out + scanner.flush(), scanner.stopped


@pytest.mark.parametrize("text", ["the end. Fin", "aXbXXc", "ééé→→X", "no stop here"])
@pytest.mark.parametrize("stops", [["XX"], ["end.", "X"], ["→X"], ["zz"], ["c", "bXX"]])
def test_stop_scanner_every_chunking(text: str, stops: list[str]) -> None:
    """Every way of cutting the text into 1-3 chunks gives the same, leak-free result."""
    cuts = [c for c in itertools.combinations(range(1, len(text)), 2)] + [(i,) for i in range(len(text))]
    first = min((i for i in (text.find(s) for s in stops) if i != -1), default=-1)
    expected = (text[:first], True) if first != -1 else (text, False)
    for cut in cuts:
        bounds = [0, *cut, len(text)]
        chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        assert _scan(chunks, stops) == expected, chunks


def test_stop_scanner_never_emits_a_stop_prefix_early() -> None:
    scanner = StopScanner(["STOP"])
    assert scanner.push("abc ST") == "abc "
    assert scanner.push("O") == ""
    assert scanner.push("x") == "STOx"
    assert scanner.push("STOP and more") == ""
    assert scanner.stopped and scanner.flush() == ""


# -- detokenization ----------------------------------------------------------------------------


def test_incremental_decoder_handles_split_utf8() -> None:
    tokenizer = build_tokenizer()
    text = "héllo wörld → 日本語 🎉 done"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    decoder = IncrementalDecoder(lambda xs: str(tokenizer.decode(xs, skip_special_tokens=True)))
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_stream_counts_every_token_once() -> None:
    tokenizer = build_tokenizer()
    ids = tokenizer("ab→cd", add_special_tokens=False)["input_ids"]
    stream = TextStream(lambda xs: str(tokenizer.decode(xs)), ("cd",))
    sent, tokens = "", 0
    for i in ids:
        sent += "".join(str(o) for o in stream.push(i))
        if stream.stopped:
            break
    sent += "".join(str(o) for o in stream.finish())
    tokens += stream.take_tokens()
    assert sent == "ab→" and tokens == len(ids)


# -- sampling ----------------------------------------------------------------------------------


def test_sample_greedy_top_p_and_inverse_cdf() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3], [0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]))
    tokens = sample(
        logits,
        temperature=torch.tensor([0.0, 1.0, 1.0, 1.0]),
        top_p=torch.tensor([1.0, 1.0, 0.5, 0.75]),
        uniform=torch.tensor([0.99, 0.05, 0.99, 0.99]),
    )
    # greedy; u=0.05 falls in token 0's mass; top_p 0.5 leaves only the top token; 0.75 leaves
    # tokens 0 and 2 (0.5 + 0.3) and u=0.99 picks the last of them.
    assert tokens.tolist() == [1, 0, 1, 2]


def test_sample_distribution_follows_probabilities() -> None:
    probs = torch.tensor([0.2, 0.5, 0.3])
    u = torch.linspace(0, 1, 1001)[:-1]
    tokens = sample(
        torch.log(probs).expand(len(u), 3), temperature=torch.ones(len(u)), top_p=torch.ones(len(u)), uniform=u
    )
    share = torch.bincount(tokens, minlength=3).float() / len(u)
    assert torch.allclose(share, probs, atol=0.01)


def test_penalties() -> None:
    index = penalty_index([{1: 2}, {}], device=torch.device("cpu"))
    assert [t.tolist() for t in index] == [[0], [1], [2.0]]
    logits = torch.tensor([[1.0, 2.0, -1.0], [1.0, 2.0, -1.0]])
    out = apply_penalties(
        logits,
        index,
        repetition=torch.tensor([2.0, 2.0]),
        presence=torch.tensor([0.5, 0.5]),
        frequency=torch.tensor([0.25, 0.25]),
    )
    assert out.tolist() == [[1.0, 2.0 / 2 - 0.5 - 0.5, -1.0], [1.0, 2.0, -1.0]]
    assert logits[0, 1] == 2.0  # the input is not modified
    neg = apply_penalties(
        torch.tensor([[-2.0, 3.0]]),
        penalty_index([{0: 1}], device=torch.device("cpu")),
        repetition=torch.tensor([2.0]),
        presence=torch.zeros(1),
        frequency=torch.zeros(1),
    )
    assert neg.tolist() == [[-4.0, 3.0]]


def test_nucleus_prefilter_matches_full_sort() -> None:
    torch.manual_seed(1)
    for scale in (0.1, 1.0, 5.0):  # flat distributions need more than the prefilter holds
        logits = torch.randn(8, 3000) * scale
        u = torch.rand(8)
        top_p = torch.tensor([0.5, 0.9, 0.99, 0.2, 0.95, 0.7, 0.8, 0.999])
        got = sample(logits, temperature=torch.ones(8), top_p=top_p, uniform=u)
        probs = torch.softmax(logits, -1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs
        kept = torch.where(before < top_p[:, None], sorted_probs, torch.zeros_like(sorted_probs))
        cdf = kept.cumsum(-1)
        pos = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(1)
        assert got.tolist() == order.gather(1, pos[:, None]).squeeze(1).tolist()


# -- cache -------------------------------------------------------------------------------------


def test_cache_merge_and_select_keep_rows_right_aligned() -> None:
    def filled(rows: int, length: int, value: float) -> SlabCache:
        cache = SlabCache()
        cache.update(torch.full((rows, 1, length, 2), value), torch.full((rows, 1, length, 2), -value), 0)
        return cache

    merged = merge([filled(2, 3, 1.0), filled(1, 5, 2.0)])
    keys = merged.slabs[0].keys
    assert keys is not None
    assert keys.shape == (3, 1, 5, 2)
    assert keys[:2, 0, :2].abs().sum() == 0 and bool((keys[:2, 0, 2:] == 1).all())
    assert bool((keys[2] == 2).all())
    merged.update(torch.full((3, 1, 1, 2), 9.0), torch.zeros(3, 1, 1, 2), 0)  # a decode step
    kept = select(merged, torch.tensor([2, 0]), drop_left=1)
    assert kept.length == 5
    assert kept.slabs[0].keys is not None
    assert kept.slabs[0].keys[:, 0, :, 0].tolist() == [[2, 2, 2, 2, 9], [0, 1, 1, 1, 9]]


# -- the engine on a tiny model ----------------------------------------------------------------


def _request(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": TINY, "messages": [{"role": "user", "content": content}], **extra}


async def _tiny(template: str | None = None, **kwargs: Any) -> TransformersBackend:
    model, tokenizer = build(template) if template else build()
    backend = TransformersBackend.from_model(model, tokenizer, model_id=TINY, **kwargs)
    await backend.start()
    return backend


@pytest.fixture
async def tiny() -> AsyncIterator[TransformersBackend]:
    backend = await _tiny(slots=4)
    try:
        yield backend
    finally:
        await backend.close()


async def _collect(backend: TransformersBackend, request: dict[str, Any]) -> list[Any]:
    return [item async for item in backend.generate(TINY, request)]


def _text(items: list[Any], index: int = 0) -> str:
    return "".join(i.text for i in items if isinstance(i, Piece) and i.index == index)


async def test_length_finish_and_exact_counts(tiny: TransformersBackend) -> None:
    items = await asyncio.wait_for(_collect(tiny, _request(max_tokens=12, temperature=0)), 30)
    usage = items[-1]
    assert isinstance(usage, Usage) and usage.completion_tokens == 12
    tokenizer = build_tokenizer()
    prompt = tokenizer.apply_chat_template(_request()["messages"], add_generation_prompt=True, tokenize=False)
    assert usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert [i for i in items if isinstance(i, Finish)] == [Finish(0, "length")]
    assert sum(i.tokens for i in items if isinstance(i, Piece)) == 12
    assert sum(isinstance(i, Usage) for i in items) == 1


async def test_seed_reproducible_and_choices_differ(tiny: TransformersBackend) -> None:
    req = _request(max_tokens=16, temperature=1.0, seed=42, n=2)
    first, second = [await asyncio.wait_for(_collect(tiny, req), 30) for _ in range(2)]
    assert _text(first, 0) == _text(second, 0) and _text(first, 1) == _text(second, 1)
    assert _text(first, 0) != _text(first, 1)
    other = await asyncio.wait_for(_collect(tiny, dict(req, seed=7)), 30)
    assert _text(other, 0) != _text(first, 0)
    assert isinstance(first[-1], Usage) and first[-1].completion_tokens == 32
    assert sorted(i.index for i in first if isinstance(i, Finish)) == [0, 1]


async def test_stop_string_is_cut_without_leaking(tiny: TransformersBackend) -> None:
    base = _request(max_tokens=40, temperature=0)
    full = _text(await asyncio.wait_for(_collect(tiny, base), 30))
    candidates = [full[i : i + 3] for i in range(6, len(full) - 3) if "\ufffd" not in full[i : i + 3]]
    assert candidates, full
    stop = candidates[0]
    items = await asyncio.wait_for(_collect(tiny, dict(base, stop=[stop, "never-seen"])), 30)
    assert _text(items) == full[: full.find(stop)]
    assert [i.reason for i in items if isinstance(i, Finish)] == ["stop"]
    assert stop not in "".join(i.text for i in items if isinstance(i, Piece))


async def test_request_joins_mid_flight_and_matches_solo(tiny: TransformersBackend) -> None:
    short = _request("a different prompt, longer than the first one", max_tokens=20, temperature=0)
    solo = _text(await asyncio.wait_for(_collect(tiny, short), 30))
    long_done = asyncio.Event()
    long_items: list[Any] = []

    async def run_long() -> None:
        async for item in tiny.generate(TINY, _request("hi", max_tokens=400, temperature=0)):
            long_items.append(item)
        long_done.set()

    task = asyncio.create_task(run_long())
    try:
        deadline = time.monotonic() + 30
        while not long_items and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert long_items, "the long request never started"
        joined = await asyncio.wait_for(_collect(tiny, short), 30)
        assert not long_done.is_set(), "the long request ended before the short one joined"
        await asyncio.wait_for(task, 60)
    finally:
        task.cancel()
    assert _text(joined) == solo  # padding and merging into a running batch did not change it
    assert isinstance(long_items[-1], Usage)


async def test_shared_prompt_prefix_is_exact() -> None:
    """A default system prompt is computed once and shared; results equal a full prefill."""
    shared = await _tiny(CHATML_WITH_SYSTEM, slots=4)
    plain = await _tiny(CHATML_WITH_SYSTEM, slots=4, share_prefix=False)
    try:
        assert shared._engine is not None and len(shared._engine._prefix) >= 8
        reqs = [_request(p, max_tokens=15, temperature=0) for p in ("hi", "a longer question here", "é?")]
        reqs.append(
            {
                "model": TINY,
                "temperature": 0,
                "max_tokens": 15,  # own system prompt: no sharing
                "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "x"}],
            }
        )
        for backend in (shared, plain):  # warm the shared prefix once
            await asyncio.wait_for(_collect(backend, reqs[0]), 30)
        got = await asyncio.wait_for(asyncio.gather(*(_collect(shared, r) for r in reqs)), 60)
        want = [await asyncio.wait_for(_collect(plain, r), 30) for r in reqs]
        assert [_text(g) for g in got] == [_text(w) for w in want]
        assert [g[-1] for g in got] == [w[-1] for w in want]  # same usage
    finally:
        await shared.close()
        await plain.close()


async def test_cancel_frees_the_row(tiny: TransformersBackend) -> None:
    gen = tiny.generate(TINY, _request(max_tokens=400, temperature=0))
    for _ in range(3):
        await asyncio.wait_for(anext(gen), 30)
    engine = tiny._engine
    assert engine is not None and engine.busy_rows == 1
    await gen.aclose()
    deadline = time.monotonic() + 5
    while engine.busy_rows and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert engine.busy_rows == 0
    items = await asyncio.wait_for(_collect(tiny, _request(max_tokens=3)), 30)
    assert isinstance(items[-1], Usage)


async def test_more_requests_than_rows_queue_and_all_finish() -> None:
    backend = await _tiny(slots=2)
    try:
        reqs = [_request(f"prompt {i}", max_tokens=5 + i, temperature=0.7, seed=i) for i in range(5)]
        results = await asyncio.wait_for(asyncio.gather(*(_collect(backend, r) for r in reqs)), 60)
        for i, items in enumerate(results):
            assert isinstance(items[-1], Usage) and items[-1].completion_tokens <= 5 + i
    finally:
        await backend.close()


async def test_context_length_is_checked_and_respected() -> None:
    backend = await _tiny(slots=2, max_context=64)
    try:
        assert backend.models()[0].context_length == 64
        with pytest.raises(ContextLengthError) as e:
            backend.check(TINY, _request(max_tokens=41))
        assert e.value.status == 400 and "maximum context length is 64" in e.value.message
        with pytest.raises(ContextLengthError):
            backend.check(TINY, _request("x" * 80))
        items = await asyncio.wait_for(_collect(backend, _request()), 30)  # no max_tokens: fill the context
        usage = items[-1]
        assert isinstance(usage, Usage) and usage.prompt_tokens + usage.completion_tokens <= 64
        finish = [i for i in items if isinstance(i, Finish)][0]
        assert finish.reason == "length" or usage.prompt_tokens + usage.completion_tokens < 64
    finally:
        await backend.close()


async def test_check_refuses_what_it_cannot_serve(tiny: TransformersBackend) -> None:
    with pytest.raises(ModelNotFoundError):
        tiny.check("other-model", _request())
    with pytest.raises(UnsupportedError):
        tiny.check(TINY, _request(tools=[{"type": "function", "function": {"name": "f"}}]))
    with pytest.raises(InvalidRequestError):
        tiny.check(TINY, _request(temperature=3))
    with pytest.raises(InvalidRequestError):
        tiny.check(TINY, _request(top_p=0))
    tiny.check(TINY, _request(max_tokens=10))


# -- SmolLM2 end to end ------------------------------------------------------------------------


async def test_smollm2_answers_paris(smol_data_dir: Path) -> None:
    from worker.smollm import MODEL_ID, ModelMissingError, find_gguf

    try:
        find_gguf()
    except ModelMissingError as e:
        pytest.fail(f"SmolLM2 is needed for this test: {e}")
    settings = WorkerSettings.from_args(["--data-dir", str(smol_data_dir), "--slots", "4"])
    backend = TransformersBackend.from_settings(settings)
    await asyncio.wait_for(backend.start(), 300)
    try:
        assert [m.id for m in backend.models()] == [MODEL_ID]
        req = {
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 40,
        }
        backend.check(MODEL_ID, req)
        items = await asyncio.wait_for(_collect_model(backend, MODEL_ID, req), 60)
        answer = "".join(i.text for i in items if isinstance(i, Piece))
        assert "Paris" in answer, answer
        assert isinstance(items[-1], Usage) and items[-1].prompt_tokens > 10
        assert [i.reason for i in items if isinstance(i, Finish)] == ["stop"]
    finally:
        await backend.close()


async def _collect_model(backend: TransformersBackend, model: str, request: dict[str, Any]) -> list[Any]:
    return [item async for item in backend.generate(model, request)]


async def test_a_trailing_assistant_message_is_continued_not_closed(tmp_path) -> None:
    """Assistant prefill: the prompt ends inside the assistant turn, so generation continues it."""
    from tests.tiny_model import build
    from worker.engine import TransformersBackend

    model, tokenizer = build()
    backend = TransformersBackend.from_model(model, tokenizer, model_id="tiny", slots=2)
    await backend.start()
    try:
        plain = backend._prompt({"messages": [{"role": "user", "content": "hi"}]})
        cont = backend._prompt(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello the"}]}
        )
        text = tokenizer.decode(cont)
        assert text.endswith("Hello the")  # no end-of-turn after the prefix
        assert tokenizer.decode(plain).rstrip().endswith("assistant")
    finally:
        await backend.close()


def test_special_token_markup_reaches_the_parser() -> None:
    """Decoding skips special tokens; one that is tool-call markup (llama3's <|python_tag|>,
    here played by <|im_start|>) still reaches the parser as its text."""
    from worker.engine_tools import markup_tokens
    from worker.toolcalls import ToolCallParser
    from worker.toolformats import FORMATS

    tokenizer = build_tokenizer()
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    fmt = FORMATS["llama3"]
    assert markup_tokens(tokenizer, fmt) == {}  # the tiny tokenizer has no <|python_tag|>
    stream = TextStream(
        lambda xs: str(tokenizer.decode(xs, skip_special_tokens=True)),
        (),
        parser=ToolCallParser(fmt, new_id=lambda: "call_1"),
        markup={special: fmt.marker},
    )
    ids = [*tokenizer("Sure. ", add_special_tokens=False)["input_ids"], special]
    ids += tokenizer('{"name": "f", "parameters": {"x": 1}}', add_special_tokens=False)["input_ids"]
    out = [o for i in ids for o in stream.push(i)] + stream.finish()
    text = "".join(o for o in out if isinstance(o, str))
    calls = [o for o in out if not isinstance(o, str)]
    assert text == "Sure. " and calls[0].name == "f"
    assert "".join(c.arguments for c in calls) == '{"x": 1}'
    assert stream.calls == 1 and stream.take_tokens() == len(ids)
