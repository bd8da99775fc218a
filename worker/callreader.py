"""One tool call's JSON as a model writes it, a character at a time: the function it names, and
what of its arguments may go out so far.

A call is a JSON object that names its function (`name`) and gives its arguments (`arguments`,
llama3's `parameters`): an object, or, from some models, a JSON string holding one. `CallReader`
checks the JSON as it comes (`worker.jsonscan`), knows the name as soon as it is complete, and
hands out the arguments in pieces that end where the text could be cut (`ready`), so what went
out is always the start of the arguments the model wrote. How the call ends decides the rest:

    rest()       the call is whole: the rest of its arguments (`{}` when it gave none)
    closed()     the model broke off: the rest as far as it could be cut, closed so it parses
    generated()  max_tokens cut it: the rest exactly as generated, whether it parses or not

Pure string logic, no I/O.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable, Collection

from worker.jsonscan import JsonScanner, JsonSyntaxError, Member

ARGUMENT_KEYS = ("arguments", "parameters")
_ID_ALPHABET = string.ascii_letters + string.digits
_LONGEST_ESCAPE = 6  # \uXXXX


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class NotACall(ValueError):
    """The text is not a call: not JSON, a bare JSON answer (its first key is not `name`), or a
    name that is not a string or not a function the request offered."""


class CallReader:
    """See the module docstring. `names`, when given, are the functions a call may name; `bare`:
    the call came without a marker, so it must name its function first to be a call at all."""

    __slots__ = ("_text", "_scanner", "_names", "_bare", "_new_id", "name", "id", "_sent", "_cut", "_closer")

    def __init__(self, *, names: Collection[str] | None, bare: bool, new_id: Callable[[], str] = new_call_id) -> None:
        self._text: list[str] = []
        self._scanner = JsonScanner()
        self._names = names
        self._bare = bare
        self._new_id = new_id
        self.name: str | None = None
        self.id = ""
        self._sent = -1  # index in `_text` up to which arguments went out; -1: none yet
        self._cut = -1  # the arguments may be sent up to here (a `cuttable` point)
        self._closer = ""  # what closes the arguments at `_cut`

    @property
    def complete(self) -> bool:
        """The call's JSON object is closed."""
        return self._scanner.complete

    def feed(self, ch: str) -> None:
        """Read one more character; `NotACall` at the first sign that this is not a call."""
        self._text.append(ch)
        scanner = self._scanner
        try:
            scanner.feed(ch)
        except JsonSyntaxError as e:
            raise NotACall(str(e)) from e
        if self.name is None:
            self._find_name()
        if scanner.value_open and scanner.member_key in ARGUMENT_KEYS and self._text[scanner.member_start] in "{[":
            if self._sent < 0:
                self._sent = scanner.member_start
            if scanner.cuttable:
                self._cut, self._closer = len(self._text), scanner.closing(1)
        elif self._sent >= 0 and scanner.members:
            last = scanner.members[-1]
            if last.key in ARGUMENT_KEYS and last.end == len(self._text):  # they just closed: all may go
                self._cut, self._closer = len(self._text), ""

    def ready(self) -> str:
        """The arguments that may go out now: from what went out to the last point they could be cut."""
        if self._sent < 0 or self._cut <= self._sent:
            return ""
        out = "".join(self._text[self._sent : self._cut])
        self._sent = self._cut
        return out

    def rest(self) -> str:
        """The call is whole: the rest of its arguments. Arguments given as a JSON string holding
        JSON go out as that JSON; other scalars as their JSON."""
        text = "".join(self._text)
        arguments = self._arguments()
        if arguments is None:
            return "{}"
        if text[arguments.start] in "{[":
            return text[self._sent : arguments.end]
        return _scalar(text[arguments.start : arguments.end])

    def closed(self) -> str:
        """The model broke off: the rest of the arguments as far as they could be cut, closed."""
        if self._sent < 0:
            return "{}"
        return "".join(self._text[self._sent : max(self._sent, self._cut)]) + self._closer

    def generated(self) -> str:
        """max_tokens cut the call: the rest of its arguments exactly as far as they were
        generated ("" when they had not begun). A JSON string holding them, cut, goes out as what
        of it can be read."""
        scanner = self._scanner
        text = "".join(self._text)
        if scanner.value_open and scanner.member_key in ARGUMENT_KEYS:
            start = scanner.member_start
            return text[self._sent :] if text[start] in "{[" else _cut_string(text[start:])
        arguments = self._arguments()
        if arguments is None:
            return ""
        if text[arguments.start] in "{[":
            return text[self._sent : arguments.end]
        return _scalar(text[arguments.start : arguments.end])

    def _find_name(self) -> None:
        scanner = self._scanner
        if self._bare and scanner.member_key not in ("", "name"):
            raise NotACall("a bare JSON answer, not a call: calls name their function first")
        if scanner.members and scanner.members[-1].key == "name":
            member = scanner.members[-1]
            name = json.loads("".join(self._text[member.start : member.end]))
            if not isinstance(name, str) or (self._names is not None and name not in self._names):
                raise NotACall("the name is not a function the request offered")
            self.name, self.id = name, self._new_id()

    def _arguments(self) -> Member | None:
        return next((m for m in reversed(self._scanner.members) if m.key in ARGUMENT_KEYS), None)


def _scalar(raw: str) -> str:
    """Arguments written as a scalar: a JSON string holding JSON is that JSON; anything else, its JSON."""
    value = json.loads(raw)
    return value if isinstance(value, str) and _is_json(value) else json.dumps(value)


def _cut_string(raw: str) -> str:
    """What can be read of a JSON string cut short (a cut escape left out); "" if `raw` is no string."""
    if not raw.startswith('"'):
        return ""
    for drop in range(min(_LONGEST_ESCAPE, len(raw) - 1) + 1):
        try:
            value = json.loads(raw[: len(raw) - drop] + '"')
        except ValueError:
            continue
        return value if isinstance(value, str) else ""
    return ""


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
