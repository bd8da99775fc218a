"""Reading a request body: the one place every route's JSON body is read and decoded.

`read_json` reads the body within a size limit and a read timeout, then `parse_json` decodes it
into plain JSON values that every later step can hold: the job's msgpack envelope (integers of
at most 64 bits, strings that encode to UTF-8, nesting msgpack and pydantic take without
recursing deep), the validators and the logs. Whatever the client sent, the answer to bad
input is an `InvalidRequestError` (400), a `RequestTooLargeError` (413) or a
`RequestTimeoutError` (408), never a 500 from deep inside, and it names the parameter where it
can (`messages[0].content`).

What is refused, and why:
- a body over the limit (declared or streamed), or one that does not arrive within the timeout;
- bytes that are not UTF-8 (JSON's own auto-detection of UTF-16/32 is not used), or not JSON;
- integers outside [-2**63, 2**64 - 1] anywhere, also in fields the gateway ignores: the job
  envelope could not carry them;
- NaN, Infinity and numbers that overflow a float (`1e999`): JSON has no such values;
- strings (values or keys) with lone surrogates (`"\\ud800"`): they cannot be encoded as UTF-8;
- nesting deeper than MAX_DEPTH.

The checks cost little on ordinary bodies: the walk over the decoded value looks at strings
and integers only if the raw text holds a `\\u` escape of a surrogate or a run of 19+ digits.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from fastapi import Request

from schemas.errors import InvalidRequestError, RequestTimeoutError, RequestTooLargeError

MAX_DEPTH = 64  # arrays and objects inside each other; OpenAI's own bodies need fewer than 10
INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack carries

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_LONG_DIGITS = re.compile(rb"[0-9]{19}")

NOT_JSON = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
    "HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)


class _Unrepresentable:
    """A number the parser met that no later step could hold (its text is kept for the message)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


async def read_body(request: Request, *, limit: int, timeout: float) -> bytes:
    """The raw body: 413 past `limit` bytes (declared or streamed), 408 if it takes longer than
    `timeout` seconds to arrive."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLargeError(f"The request body is larger than the {limit}-byte limit.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise RequestTooLargeError(f"The request body is larger than the {limit}-byte limit.")
    except TimeoutError as e:
        raise RequestTimeoutError(f"The request body did not arrive within {timeout:g} seconds.") from e
    return bytes(body)


async def read_json(request: Request, *, limit: int, timeout: float) -> Any:
    """The body, read (`read_body`) and decoded (`parse_json`)."""
    return parse_json(await read_body(request, limit=limit, timeout=timeout))


def parse_json(body: bytes) -> Any:
    """Decode a JSON body into values every later step can hold (see the module docstring)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequestError(f"The request body is not valid UTF-8 (byte {e.start}).", code="invalid_json") from e
    odd: list[_Unrepresentable] = []

    def unrepresentable(text: str) -> _Unrepresentable:
        odd.append(_Unrepresentable(text[:24] + ("..." if len(text) > 24 else "")))
        return odd[-1]

    def parse_int(text: str) -> int | _Unrepresentable:
        # beyond 64 bits for sure: not even converted (int() of 5,000 digits is slow, of more refused)
        return unrepresentable(text) if len(text) > 20 else int(text)

    def parse_float(text: str) -> float | _Unrepresentable:
        value = float(text)
        return value if math.isfinite(value) else unrepresentable(text)

    try:
        value = json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=unrepresentable)
    except RecursionError as e:
        raise _too_deep("") from e
    except ValueError as e:
        raise InvalidRequestError(NOT_JSON, code="invalid_json") from e
    if (
        odd
        or text.count("[") + text.count("{") > MAX_DEPTH
        or _SURROGATE_ESCAPE.search(body)
        or _LONG_DIGITS.search(body)
    ):
        _check(value)
    return value


def _too_deep(path: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"The request body is nested more than {MAX_DEPTH} levels deep" + (f" (at '{path}')." if path else "."),
        param=path or None,
        code="invalid_json",
    )


def _check(value: Any) -> None:
    """Walk the decoded value without recursion; the first value no later step could hold is
    refused, named by its path."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= MAX_DEPTH:
                raise _too_deep(path)
            for key, child in item.items():
                child_path = _join(path, key)
                if not _encodable(key):
                    raise InvalidRequestError(
                        f"A key in '{path or 'the body'}' is not valid Unicode (a lone surrogate).",
                        param=path or None,
                        code="invalid_value",
                    )
                stack.append((child, child_path, depth + 1))
        elif isinstance(item, list):
            if depth >= MAX_DEPTH:
                raise _too_deep(path)
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            if not _encodable(item):
                raise InvalidRequestError(
                    f"Invalid value for '{path}': the string is not valid Unicode (a lone surrogate).",
                    param=path or None,
                    code="invalid_value",
                )
        elif isinstance(item, _Unrepresentable):
            raise InvalidRequestError(
                f"Invalid value for '{path}': {item.text} is not a number this API accepts "
                "(integers must fit in 64 bits; NaN and Infinity are not JSON).",
                param=path or None,
                code="invalid_value",
            )
        elif isinstance(item, int) and not isinstance(item, bool) and not INT_MIN <= item <= INT_MAX:
            raise InvalidRequestError(
                f"Invalid value for '{path}': {item} does not fit in 64 bits.",
                param=path or None,
                code="invalid_value",
            )


def _join(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key, ensure_ascii=True)}]"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
