"""An incremental JSON syntax checker, fed one character at a time, for parsing model output.

A tool call streamed by a model arrives a few characters at a time. `JsonScanner` says, after
every character, whether what it has seen is still the start of one valid JSON value, whether
the value is complete, and, where the text so far could be cut, what would close it (`closing`),
so a parser can stream a call's arguments as they come and still end with valid JSON when the
model breaks off. It also records the spans of the members of a top-level object (`members`),
so the parser can find a call's `name` and `arguments` without parsing the text twice.

Pure string logic, no I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_LITERALS = ("true", "false", "null")
_WHITESPACE = frozenset(" \t\n\r")
_HEX = frozenset("0123456789abcdefABCDEF")

# States: where the next character falls.
_VALUE = 0  # a value must start (after ':' or ',' in an array, or at the very start)
_FIRST_KEY = 1  # just after '{': a key or '}'
_KEY = 2  # after ',' in an object: a key
_COLON = 3  # after a key
_AFTER = 4  # after a value inside a container: ',' or the container's closer
_STRING = 5
_ESCAPE = 6
_UNICODE = 7
_SCALAR = 8  # inside a number or a literal (true, false, null)
_FIRST_ITEM = 9  # just after '[': a value or ']'
_DONE = 10  # the top-level value is complete


class JsonSyntaxError(ValueError):
    """The text is not (the start of) one JSON value."""


@dataclass(frozen=True, slots=True)
class Member:
    """One member of the top-level object: its key and where its value lies in the text."""

    key: str
    start: int  # index of the value's first character
    end: int  # index just past its last character


class JsonScanner:
    """See the module docstring. `feed` raises `JsonSyntaxError` at the first bad character."""

    __slots__ = (
        "_stack",
        "_state",
        "_key",
        "_token",
        "_hex",
        "_pos",
        "_key_raw",
        "_member_key",
        "_value_start",
        "members",
    )

    def __init__(self) -> None:
        self._stack: list[str] = []  # open containers: '{' or '['
        self._state = _VALUE
        self._key = False  # the string being read is an object key
        self._token = ""  # the number or literal being read
        self._hex = 0  # hex digits still expected in a \u escape
        self._pos = -1  # index of the character being fed
        self._key_raw: list[str] | None = None  # a top-level key's characters, while reading it
        self._member_key = ""
        self._value_start = -1
        self.members: list[Member] = []

    @property
    def complete(self) -> bool:
        return self._state == _DONE

    @property
    def depth(self) -> int:
        return len(self._stack)

    @property
    def value_open(self) -> bool:
        """A member value of the top-level object has started and not ended."""
        return self._value_start >= 0

    @property
    def member_key(self) -> str:
        """The key of the top-level member being read (valid while `value_open`)."""
        return self._member_key

    @property
    def member_start(self) -> int:
        return self._value_start

    @property
    def cuttable(self) -> bool:
        """The text so far, followed by `closing()`, is valid JSON: it ends just after a complete
        value or number, just after an opening bracket, or inside a string value (not in an escape)."""
        state = self._state
        if state == _SCALAR:  # a number may be cut where it is complete (`12` of `123`)
            return self._token[0] not in "tfn" and _NUMBER.fullmatch(self._token) is not None
        return state in (_AFTER, _FIRST_KEY, _FIRST_ITEM, _DONE) or (state == _STRING and not self._key)

    def closing(self, depth: int = 0) -> str:
        """What closes the text so far (where `cuttable`), for the containers above `depth`."""
        quote = '"' if self._state == _STRING and len(self._stack) >= depth else ""
        closers = "".join("}" if c == "{" else "]" for c in reversed(self._stack[depth:]))
        return quote + closers

    def feed(self, ch: str) -> None:
        self._pos += 1
        state = self._state
        if self._key_raw is not None and not (state == _STRING and ch == '"'):
            self._key_raw.append(ch)
        if state == _STRING:
            if ch == '"':
                self._end_string()
            elif ch == "\\":
                self._state = _ESCAPE
            elif ch < " ":
                raise JsonSyntaxError("a control character inside a string")
            return
        if state == _ESCAPE:
            if ch == "u":
                self._state, self._hex = _UNICODE, 4
            elif ch in '"\\/bfnrt':
                self._state = _STRING
            else:
                raise JsonSyntaxError(f"bad escape \\{ch}")
            return
        if state == _UNICODE:
            if ch not in _HEX:
                raise JsonSyntaxError("bad \\u escape")
            self._hex -= 1
            if not self._hex:
                self._state = _STRING
            return
        if state == _SCALAR:
            if self._token[0] in "-0123456789":
                if ch in _NUMBER_CHARS:
                    self._token += ch
                    return
                if not _NUMBER.fullmatch(self._token):
                    raise JsonSyntaxError(f"bad number {self._token!r}")
                self._end_value(self._pos)  # the delimiter is read below
                state = self._state
            else:
                self._token += ch
                if not any(word.startswith(self._token) for word in _LITERALS):
                    raise JsonSyntaxError(f"bad literal {self._token!r}")
                if self._token in _LITERALS:
                    self._end_value(self._pos + 1)
                return
        if ch in _WHITESPACE:
            return
        if state == _DONE:
            raise JsonSyntaxError("text after the end of the value")
        if state in (_VALUE, _FIRST_ITEM):
            if state == _FIRST_ITEM and ch == "]":
                self._close()
            else:
                self._start_value(ch)
        elif state in (_FIRST_KEY, _KEY):
            if ch == '"':
                self._state, self._key = _STRING, True
                if len(self._stack) == 1:
                    self._key_raw = []
            elif ch == "}" and state == _FIRST_KEY:
                self._close()
            else:
                raise JsonSyntaxError("an object key must be a string")
        elif state == _COLON:
            if ch != ":":
                raise JsonSyntaxError("expected ':' after an object key")
            self._state = _VALUE
        elif state == _AFTER:
            top = self._stack[-1]
            if ch == ",":
                self._state = _KEY if top == "{" else _VALUE
            elif (ch == "}" and top == "{") or (ch == "]" and top == "["):
                self._close()
            else:
                raise JsonSyntaxError(f"unexpected {ch!r} after a value")

    def _start_value(self, ch: str) -> None:
        if len(self._stack) == 1 and self._stack[0] == "{":
            self._value_start = self._pos
        if ch == "{" or ch == "[":
            self._stack.append(ch)
            self._state = _FIRST_KEY if ch == "{" else _FIRST_ITEM
        elif ch == '"':
            self._state, self._key = _STRING, False
        elif ch == "-" or ch.isdigit() or ch in "tfn":
            self._state, self._token = _SCALAR, ch
        else:
            raise JsonSyntaxError(f"a value cannot start with {ch!r}")

    def _end_string(self) -> None:
        if self._key:
            self._key = False
            self._state = _COLON
            if self._key_raw is not None:
                self._member_key = json.loads('"' + "".join(self._key_raw) + '"')
                self._key_raw = None
        else:
            self._end_value(self._pos + 1)

    def _close(self) -> None:
        self._stack.pop()
        self._end_value(self._pos + 1)

    def _end_value(self, end: int) -> None:
        self._token = ""
        if self._stack:
            self._state = _AFTER
            if len(self._stack) == 1 and self._value_start >= 0:
                self.members.append(Member(self._member_key, self._value_start, end))
                self._value_start = -1
        else:
            self._state = _DONE
