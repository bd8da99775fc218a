"""Constrained decoding: grammars for structured outputs and forced tool calls, and per-token masks.

Built on llguidance (chosen by measurement, see bench/RESULTS.md section 4: millisecond grammar
compiles, tens of microseconds per token mask on SmolLM2's 49k vocabulary, no dependencies).
`Grammars` is made once per model: it knows the tokenizer and turns a request's
`response_format` or forced `tool_choice` into a grammar (llguidance's Lark syntax with inline
JSON schemas), checked up front so a bad schema is a 400, not a failed generation. Each
constrained sequence gets its own `Constraint` (a matcher); the engine thread fills a bitmask
row per constrained sequence each step and masks the logits with `apply_bitmask`.

JSON is written compactly with spaced separators (`{"a": 1, "b": [2, 3]}`): a grammar that
allowed free whitespace would let a small model loop on newlines forever.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from schemas.errors import InvalidRequestError, UnsupportedError
from worker.engine_tools import ToolPlan
from worker.toolformats import Format

_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE = 64  # compiled grammars kept per model (matchers are copied from them)
_SHIFTS = torch.arange(32, dtype=torch.int32)
_ERROR = re.compile(r"^(?:at \d+\(\d+\): )?(.*)$")  # llguidance's message, minus its position


class GrammarError(ValueError):
    """A schema or grammar the constraint library cannot take (the request's fault)."""


class Constraint:
    """One sequence's matcher: which tokens may come next, and the token that came."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask into `row` (int32, contiguous, on the CPU)."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, token: int) -> bool:
        return bool(self._matcher.consume_token(token))

    @property
    def error(self) -> str:
        return str(self._matcher.get_error()) if self._matcher.is_error() else ""


class Grammars:
    """Grammars for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer: Any, *, vocab_size: int, eos_ids: Iterable[int]) -> None:
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self._tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=sorted(eos_ids))
        self.vocab_size = vocab_size
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    def token_bytes(self, token: int) -> bytes:
        return bytes(self._tok.decode_bytes([token]))

    # -- grammars from requests ---------------------------------------------------------------

    def json_schema(self, schema: dict[str, Any] | None, *, strict: bool) -> str:
        """Any JSON object (`schema` None: `json_object`), or JSON matching `schema`."""
        body = {"type": "object"} if schema is None else schema
        return "start: answer\n" + _json_rule("answer", body, strict=strict)

    def tool_calls(
        self,
        fmt: Format,
        tools: Sequence[dict[str, Any]],
        *,
        parallel: bool,
        answer: str = "",
    ) -> str:
        """Calls of these functions in the model's own markup, one or more (`parallel`). With an
        `answer` grammar (from `json_schema`), the model may answer with it instead of calling."""
        key = "parameters" if fmt.name == "llama3" else "arguments"
        strict = all(bool((t.get("function") or {}).get("strict")) for t in tools)
        schema = {"anyOf": [_call_schema(t, key) for t in tools]}
        if fmt.name == "hermes":
            call = f'"{fmt.marker}\\n" call_json "\\n{fmt.end_tag}"'
            calls = 'call ("\\n" call)*' if parallel else "call"
        elif fmt.name == "llama3":
            call, calls = "call_json", ('call ("; " call)*' if parallel else "call")
        else:  # mistral: the parser reads a bare array when forced
            call, calls = "call_json", ('"[" call (", " call)* "]"' if parallel else '"[" call "]"')
        lines = [
            "start: calls" + (" | answer_start" if answer else ""),
            f"calls: {calls}",
            f"call: {call}",
            _json_rule("call_json", schema, strict=strict).strip(),
        ]
        if answer:
            lines.append(answer.replace("start: answer", "answer_start: answer", 1))
        return "\n".join(lines) + "\n"

    # -- matchers -----------------------------------------------------------------------------

    def check(self, grammar: str) -> None:
        """Compile `grammar` (cached), or raise `GrammarError` saying why it cannot be used."""
        self._prototype(grammar)

    def constraint(self, grammar: str) -> Constraint:
        return Constraint(self._prototype(grammar).deep_copy())

    def _prototype(self, grammar: str) -> Any:
        found = self._compiled.get(grammar)
        if found is not None:
            self._compiled.move_to_end(grammar)
            return found
        try:
            matcher = self._ll.LLMatcher(self._tok, self._ll.LLMatcher.grammar_from_lark(grammar), log_level=0)
        except (ValueError, RuntimeError) as e:
            raise GrammarError(str(e)) from e
        if matcher.is_error():
            raise GrammarError(str(matcher.get_error()))
        self._compiled[grammar] = matcher
        while len(self._compiled) > _CACHE:
            self._compiled.popitem(last=False)
        return matcher


def request_grammar(grammars: Grammars | None, request: dict[str, Any], tools: ToolPlan) -> str:
    """The grammar a request's output must follow (empty: none), checked: a schema the
    constraint library cannot take is the request's fault (a 400 naming the parameter)."""
    response_format = request.get("response_format") or {}
    kind = response_format.get("type", "text")
    if kind == "text" and not tools.forced:
        return ""
    param = "response_format" if kind != "text" and not tools.forced else "tools"
    if grammars is None:
        raise UnsupportedError(
            f"{param} needs constrained decoding, which this worker cannot do (llguidance is not installed).",
            param=param,
        )
    answer = ""
    if kind == "json_object":
        answer = grammars.json_schema(None, strict=False)
    elif kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise InvalidRequestError("response_format.json_schema.schema must be an object.", param=param)
        answer = grammars.json_schema(schema, strict=bool(spec.get("strict")))
    if tools.fmt is not None and tools.forced:
        grammar = grammars.tool_calls(tools.fmt, tools.forced, parallel=tools.parallel)
    elif tools.fmt is not None and answer:  # call a tool, or answer in the format asked for
        grammar = grammars.tool_calls(tools.fmt, tools.tools, parallel=tools.parallel, answer=answer)
    else:
        grammar = answer
    try:
        grammars.check(grammar)
    except GrammarError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid schema"
        match = _ERROR.match(first)
        reason = match.group(1) if match else first
        raise InvalidRequestError(f"Invalid schema for {param}: {reason}", param=param) from e
    return grammar


def constrain(logits: torch.Tensor, constraints: Sequence[Constraint | None]) -> torch.Tensor:
    """The logits of a batch, each constrained row masked to the tokens its grammar allows."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    bitmask = allocate_bitmask(len(rows), logits.shape[1])
    for j, i in enumerate(rows):
        constraint = constraints[i]
        assert constraint is not None
        constraint.fill(bitmask[j])
    return apply_bitmask(logits, bitmask, torch.tensor(rows, device=logits.device))


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`logits` with the tokens each of `rows` may not take set to -inf (bitmask row i is for
    rows[i]); other rows untouched."""
    allowed = ((bitmask.unsqueeze(-1) >> _SHIFTS) & 1).bool().view(bitmask.shape[0], -1)[:, : logits.shape[1]]
    allowed = allowed.to(logits.device)
    out = logits.clone()
    out[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return out


def _json_rule(name: str, schema: dict[str, Any], *, strict: bool) -> str:
    """A Lark rule holding an inline JSON schema, in our JSON style; lenient unless strict (an
    unsupported keyword is then an error, not ignored)."""
    body = dict(schema)
    body["x-guidance"] = {**_JSON_STYLE, "lenient": not strict, **(schema.get("x-guidance") or {})}
    return f"{name}: %json {json.dumps(body)}\n"


def _call_schema(tool: dict[str, Any], key: str) -> dict[str, Any]:
    function = tool.get("function") or {}
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function.get("name", "")}, key: parameters},
        "required": ["name", key],
        "additionalProperties": False,
    }
