"""The tool-call parser and its JSON scanner as pure functions: every format, every way of cutting
the text into pieces, malformed and broken-off markup, and what a client may rely on (markup never
in the text, first fragment names the call, concatenated arguments are valid JSON)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest

from schemas.events import ToolCallDelta
from worker.jsonscan import JsonScanner, JsonSyntaxError
from worker.toolcalls import Output, ToolCallParser
from worker.toolformats import FORMATS

MARKUP = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]")


def _ids() -> Iterator[str]:
    return (f"call_{i}" for i in itertools.count())


def _parser(fmt: str, **kw: Any) -> ToolCallParser:
    ids = _ids()
    return ToolCallParser(FORMATS[fmt], new_id=lambda: next(ids), **kw)


def assemble(outputs: Output) -> tuple[str, list[dict[str, str]]]:
    """What a client would build from the fragments, checking the fragment rules on the way."""
    text = ""
    calls: list[dict[str, str]] = []
    for item in outputs:
        if isinstance(item, str):
            text += item
            continue
        assert isinstance(item, ToolCallDelta)
        if item.index == len(calls):  # a new call: its first fragment names it
            assert item.id and item.name, item
            calls.append({"id": item.id, "name": item.name, "arguments": item.arguments})
        else:
            assert item.index == len(calls) - 1, "fragments of an earlier call after a later one"
            assert not item.id and not item.name, item
            calls[-1]["arguments"] += item.arguments
    return text, calls


def run(fmt: str, chunks: list[str], *, length: bool = False, **kw: Any) -> tuple[str, list[dict[str, str]]]:
    """`length`: max_tokens cut the generation after the last chunk (else the model stopped)."""
    parser = _parser(fmt, **kw)
    out: Output = []
    for chunk in chunks:
        out.extend(parser.push(chunk))
    out.extend(parser.finish(length=length))
    return assemble(out)


def every_split(text: str) -> Iterator[list[str]]:
    """The whole text; one character at a time; and cut in two at every boundary."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def calls(*pairs: tuple[str, dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(name, args) for name, args in pairs]


def check(fmt: str, text: str, want_text: str, want_calls: list[tuple[str, Any]], **kw: Any) -> None:
    for chunks in every_split(text):
        got_text, got_calls = run(fmt, chunks, **kw)
        assert got_text == want_text, chunks
        assert [(c["name"], json.loads(c["arguments"])) for c in got_calls] == want_calls, chunks
        assert [c["id"] for c in got_calls] == [f"call_{i}" for i in range(len(got_calls))]
        if want_calls:
            assert not any(m in got_text for m in MARKUP), got_text


WEATHER = {"city": "Paris", "unit": "celsius"}
NESTED = {"q": 'say "hi" \\ é', "n": [1, -2.5e3, True, None, {"k": []}]}


# -- hermes ------------------------------------------------------------------------------------


def test_hermes_one_call_between_text() -> None:
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    text = f"Let me check.\n<tool_call>\n{call}\n</tool_call>"
    check("hermes", text, "Let me check.\n", calls(("get_weather", WEATHER)))
    check("hermes", text + " Done.", "Let me check.\n Done.", calls(("get_weather", WEATHER)))


def test_hermes_parallel_calls_and_nested_arguments() -> None:
    args = json.dumps(NESTED)
    text = (
        f'<tool_call>{{"name": "a", "arguments": {args}}}</tool_call>\n'
        f'<tool_call>\n{{"arguments": {{}}, "name": "b"}}\n</tool_call>'
    )
    check("hermes", text, "\n", calls(("a", NESTED), ("b", {})))


def test_hermes_arguments_given_as_a_json_string() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>'
    check("hermes", text, "", calls(("f", {"x": 1})))


def test_hermes_arguments_stream_before_the_call_ends() -> None:
    parser = _parser("hermes")
    first = parser.push('<tool_call>{"name": "f", "arguments": {"text": "hello wor')
    assert first == [ToolCallDelta(0, "call_0", "f", '{"text": "hello wor')]
    assert parser.push('ld"}}</tool_call>') == [ToolCallDelta(0, arguments='ld"}')]
    assert parser.finish() == [] and parser.calls == 1


def test_text_is_held_back_only_while_it_may_be_a_marker() -> None:
    parser = _parser("hermes")
    assert parser.push("a <tool") == ["a "]
    assert parser.push("box>") == ["<toolbox>"]
    assert parser.push("x<") == ["x"]
    assert parser.finish() == ["<"]


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>not json</tool_call> after",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
        "<tool_call>",
        "<tool_call>\n",
        '<tool_call>{"nam',
    ],
)
def test_hermes_malformed_markup_is_text(text: str) -> None:
    check("hermes", text, text, [])


def test_a_name_not_offered_is_text() -> None:
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    check("hermes", text, text, [], names=["get_weather"])
    check("hermes", text.replace("rm_rf", "get_weather"), "", calls(("get_weather", {})), names=["get_weather"])


@pytest.mark.parametrize(
    ("text", "args"),
    [
        ('<tool_call>{"name": "f", "arguments": {"a": "unfinished str', {"a": "unfinished str"}),
        ('<tool_call>{"name": "f", "arguments": {"a": [1, 2', {"a": [1, 2]}),
        ('<tool_call>{"name": "f", "arguments": {"a": [1, 2.', {"a": [1, 2]}),
        ('<tool_call>{"name": "f", "arguments": {"a": [1, -', {"a": [1]}),
        ('<tool_call>{"name": "f", "arguments": {"a": tru', {}),
        ('<tool_call>{"name": "f", "arguments": {"a": 1, "b"', {"a": 1}),
        ('<tool_call>{"name": "f"', {}),
        ('<tool_call>{"name": "f", "arguments": {"a": 1} oops} </tool_call>tail', {"a": 1}),
        ('<tool_call>{"name": "f", "arguments": {"a": "x\\', {"a": "x"}),
        ('<tool_call>{"name": "f", "arguments": {"a": "\\u00', {"a": ""}),
        ('<tool_call>{"name": "f" "arguments": {}}</tool_call>tail', {}),
    ],
)
def test_broken_off_calls_still_have_valid_arguments(text: str, args: dict[str, Any]) -> None:
    """After the name went out, a call that breaks off is closed: its arguments still parse."""
    for chunks in every_split(text):
        got_text, got = run("hermes", chunks)
        assert [(c["name"], json.loads(c["arguments"])) for c in got] == [("f", args)], chunks
        assert got_text in ("", "tail"), chunks


def test_one_call_at_most_when_parallel_calls_are_off() -> None:
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    parser = _parser("hermes", max_calls=1)
    out = parser.push(text)
    assert parser.spent
    out += parser.finish()
    assert assemble(out) == ("", [{"id": "call_0", "name": "a", "arguments": "{}"}])


def test_a_call_without_arguments_gets_an_empty_object() -> None:
    check("hermes", '<tool_call>{"name": "now"}</tool_call>', "", calls(("now", {})))


# -- llama3 ------------------------------------------------------------------------------------


def test_llama3_bare_json_calls() -> None:
    text = '  {"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
    check("llama3", text, "", calls(("get_weather", WEATHER)))
    two = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    check("llama3", two, "", calls(("a", {"x": 1}), ("b", {})))


def test_llama3_python_tag() -> None:
    text = 'Sure.<|python_tag|>{"name": "search", "parameters": {"query": "llamas"}}'
    check("llama3", text, "Sure.", calls(("search", {"query": "llamas"})))


@pytest.mark.parametrize(
    "text",
    [
        '{"answer": 42, "name": "x"}',  # a JSON answer: its first key is not the name
        "Plain text with {braces} inside.",
        '{"name": "f", "parameters": {}',  # the name is out, so this one is closed, not text
    ],
)
def test_llama3_text_that_is_not_a_call(text: str) -> None:
    if text.endswith("{}"):
        check("llama3", text, "", calls(("f", {})))
    else:
        check("llama3", text, text, [])


# -- mistral -----------------------------------------------------------------------------------


def test_mistral_array_of_calls() -> None:
    text = '[TOOL_CALLS] [{"name": "a", "arguments": {"x": "y"}}, {"name": "b", "arguments": {"n": 2}}]'
    check("mistral", text, "", calls(("a", {"x": "y"}), ("b", {"n": 2})))
    check("mistral", "Hmm " + text + " ok", "Hmm  ok", calls(("a", {"x": "y"}), ("b", {"n": 2})))


def test_mistral_single_object_and_malformed() -> None:
    check("mistral", '[TOOL_CALLS]{"name": "a", "arguments": {}}', "", calls(("a", {})))
    check("mistral", "[TOOL_CALLS] nonsense", "[TOOL_CALLS] nonsense", [])


def test_three_way_splits_of_a_parallel_call() -> None:
    text = 'x<tool_call>{"name": "a", "arguments": {"s": "é"}}</tool_call><tool_call>{"name": "b"}</tool_call>y'
    for i, j in itertools.combinations(range(1, len(text)), 2):
        got_text, got = run("hermes", [text[:i], text[i:j], text[j:]])
        assert got_text == "xy"
        assert [(c["name"], json.loads(c["arguments"])) for c in got] == [("a", {"s": "é"}), ("b", {})]


# -- cut by max_tokens (finish_reason "length") --------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "text", "want_text"),
    [
        ("hermes", "<tool_call>", ""),
        ("hermes", "Let me check.\n<tool_call>\n", "Let me check.\n"),
        ("hermes", 'Let me check.<tool_call>\n{"na', "Let me check."),
        ("hermes", '<tool_call>{"name": "get_wea', ""),
        ("hermes", '<tool_call>{"arguments": {"city": "Par', ""),  # the name would have come last
        ("llama3", '{"na', ""),
        ("llama3", '  {"name": "sea', ""),
        ("llama3", "Sure.<|python_tag|>", "Sure."),
        ("llama3", 'Sure.<|python_tag|>{"name": "se', "Sure."),
        ("mistral", "[TOOL_CALLS]", ""),
        ("mistral", 'Hmm [TOOL_CALLS] [{"name": "a', "Hmm "),
    ],
)
def test_a_length_cut_before_the_name_drops_the_markup(fmt: str, text: str, want_text: str) -> None:
    """Neither text nor a call: what may still have become a call is dropped (OpenAI never
    answers with call markup as content, and a call without its name cannot be given)."""
    for chunks in every_split(text):
        assert run(fmt, chunks, length=True) == (want_text, []), chunks


def test_a_length_cut_keeps_what_was_text_and_drops_what_was_held_as_maybe_markup() -> None:
    check_cut = [("hermes", "<tool_call>not json"), ("llama3", '{"answer": 4'), ("mistral", "[TOOL_CALLS] nonsense")]
    for fmt, text in check_cut:
        for chunks in every_split(text):
            assert run(fmt, chunks, length=True) == (text, []), chunks
    for chunks in every_split("a <tool_ca"):  # held back as maybe a marker: dropped, as markup
        assert run("hermes", chunks, length=True) == ("a ", []), chunks
        assert run("hermes", chunks) == ("a <tool_ca", []), chunks  # the model stopped: text


@pytest.mark.parametrize(
    ("fmt", "text", "args"),
    [
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": "unfinished str', '{"a": "unfinished str'),
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": [1, 2.', '{"a": [1, 2.'),
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": tru', '{"a": tru'),
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": "x\\', '{"a": "x\\'),
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": "\\u00', '{"a": "\\u00'),
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1, "b"', '{"a": 1, "b"'),
        ("hermes", '<tool_call>\n{"name": "f", "arguments": {', "{"),
        ("hermes", '<tool_call>{"name": "f"', ""),
        ("hermes", '<tool_call>{"name": "f", "argum', ""),
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}', '{"a": 1}'),  # the arguments are whole
        ("hermes", '<tool_call>{"name": "f", "arguments": {"a": 1}}\n</tool', '{"a": 1}'),
        ("hermes", '<tool_call>{"name": "f", "arguments": "{\\"x\\": [1', '{"x": [1'),
        ("llama3", '{"name": "f", "parameters": {"q": "lla', '{"q": "lla'),
        ("llama3", '<|python_tag|>{"name": "f", "parameters": {"q": ', '{"q": '),
        ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"n": 1', '{"n": 1'),
    ],
)
def test_a_length_cut_inside_a_call_keeps_what_was_generated_of_its_arguments(fmt: str, text: str, args: str) -> None:
    """As OpenAI's API does: the call, with its arguments exactly as far as they were generated
    (not closed: they need not parse, and finish_reason "length" says why)."""
    for chunks in every_split(text):
        assert run(fmt, chunks, length=True) == ("", [{"id": "call_0", "name": "f", "arguments": args}]), chunks


FIRST = '<tool_call>{"name": "a", "arguments": {}}</tool_call>'


@pytest.mark.parametrize(
    ("fmt", "text", "second"),
    [
        ("hermes", FIRST + '\n<tool_call>\n{"nam', None),
        ("hermes", FIRST + '\n<tool_call>{"name": "b", "arguments": {"x', '{"x'),
        ("llama3", '{"name": "a", "parameters": {}}; {"na', None),
        ("llama3", '{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": [', '{"x": ['),
        ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "', None),
        ("mistral", '[TOOL_CALLS] [{"name": "a", "arguments": {}}, {"name": "b"', ""),
    ],
)
def test_a_length_cut_in_a_second_call_keeps_the_first(fmt: str, text: str, second: str | None) -> None:
    want = [{"id": "call_0", "name": "a", "arguments": "{}"}]
    if second is not None:
        want.append({"id": "call_1", "name": "b", "arguments": second})
    for chunks in every_split(text):
        got_text, got = run(fmt, chunks, length=True)
        assert got == want and got_text == ("\n" if fmt == "hermes" else ""), chunks


def test_a_stop_inside_a_call_still_closes_its_arguments() -> None:
    """Only a length cut leaves the arguments as generated: a model that ends its answer inside
    a call (or a stop sequence) meant to call, so the call goes out whole, its JSON closed."""
    text = '<tool_call>{"name": "f", "arguments": {"a": "unfinished str'
    assert run("hermes", [text]) == ("", [{"id": "call_0", "name": "f", "arguments": '{"a": "unfinished str"}'}])


# -- the scanner -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ['{"a": [1, 2.5e-3, true, false, null, "x\\n\\u00e9"], "b": {}}', "[]", '"s"', "[[[]]]", '{"": -0}'],
)
def test_scanner_accepts_json_and_every_cut_closes(text: str) -> None:
    scanner = JsonScanner()
    for i, ch in enumerate(text):
        scanner.feed(ch)
        if scanner.cuttable:
            json.loads(text[: i + 1] + scanner.closing())  # must parse
    assert scanner.complete


@pytest.mark.parametrize(
    "text", ['{"a" 1}', "{1: 2}", "[1,]", '{"a": tru}', '{"a": 01}', '{"a": 1,}', "[1] 2", '"\x01"']
)
def test_scanner_rejects_invalid_json(text: str) -> None:
    scanner = JsonScanner()
    with pytest.raises(JsonSyntaxError):
        for ch in text:
            scanner.feed(ch)


def test_scanner_member_spans() -> None:
    text = '{"name": "f", "a\\"b": {"x": [1]}, "n": 12}'
    scanner = JsonScanner()
    for ch in text:
        scanner.feed(ch)
    assert [(m.key, text[m.start : m.end]) for m in scanner.members] == [
        ("name", '"f"'),
        ('a"b', '{"x": [1]}'),
        ("n", "12"),
    ]
