"""Tool calls in a model's text: an incremental parser from generated text to text and call fragments.

A model whose chat template takes `tools` answers a call with markup in its text, in one of the
formats of `worker.toolformats`. `ToolCallParser` is fed decoded text as it comes (`push`) and
returns what is safe to send: plain text, and `ToolCallDelta` fragments. A call's first fragment
carries its id and name (as soon as the name is complete); later ones carry pieces of its
arguments, streamed as the model writes them (`worker.callreader`). Concatenated, a call's
arguments are the JSON the model wrote. The markup never reaches the text: text is held back
while it could be the start of a marker, and a region of calls while no call in it has a name
yet (it may still turn out not to be calls).

Malformed markup: if the text after a marker turns out not to be a call before anything of it
was sent (not JSON, no name, a name the request did not offer), all of it is plain text. If it
breaks off after a call's name went out (invalid JSON, or the model stopped), the arguments
sent so far are closed so they still parse (`JsonScanner.closing`) and the rest of that markup
is dropped: a call the model ended itself has arguments a client can run.

How the generation ended decides what was still held (`finish`):

- The model stopped (its end token, or a stop sequence): held text is text, and a region whose
  call had no name yet is text too. The model's whole answer is there: markup it began and did
  not finish is not a call.
- max_tokens cut it (finish_reason "length"): what was held may have been markup, so it is
  dropped, never given back as text: the start of a marker, a region whose call had no name
  yet. OpenAI's API never answers with call markup as content, and a call cannot go out without
  its name. A call whose name went out keeps what was generated of its arguments, exactly: not
  closed, so they need not parse. That is what OpenAI's API answers for a call cut by
  max_tokens (the call, its arguments as generated, finish_reason "length"), and it keeps a cut
  call from looking whole: `{"path": "/etc/pas` closed would be a different, valid path. Calls
  complete before the cut stay as they were. Of plain text a cut drops at most the last few
  characters, where they could begin a marker (an answer cut at "x <" loses its "<"): the
  parser cannot tell them from a marker spelt out a character at a time (as byte-level
  tokenizers write it, the tests' tiny model among them), and an answer already cut short loses
  less by them than it would by showing the start of markup.

  vLLM (hermes_tool_parser.py, read at 00854322) does otherwise: without streaming, when the
  last call's JSON does not parse it gives back the whole output, markup and all, as content;
  streaming, it sends nothing of a call before its name, and at the end sends the arguments
  "autocompleted" by a partial JSON parser, so the two disagree (vllm#9053), and it has labelled
  such cuts "tool_calls" (vllm#53269, vllm#58228). Here both come from the same fragments, and
  the finish reason is the engine's ("length" wins over "tool_calls").

Every character pushed is, in the end, text or markup, decided in the order they came:
`settled` says how many are, `take_runs` where the text ones went out (input positions), so
the engine can put each token's logprob with the piece its token became (`worker.pieces`).

Pure string logic, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from schemas.events import ToolCallDelta
from worker.callreader import CallReader, NotACall, new_call_id
from worker.toolformats import Format

Output = list[str | ToolCallDelta]

_WHITESPACE = frozenset(" \t\n\r")


# Parser states.
_START = "start"  # nothing sent yet (llama3: a bare call may come)
_TEXT = "text"
_OPEN = "open"  # after a marker, before a call
_CALL = "call"  # inside a call's JSON
_BETWEEN = "between"  # after a call, inside its region
_END_TAG = "end-tag"  # reading a region's closing tag
_SKIP = "skip"  # dropping the rest of broken markup
_SPENT = "spent"  # the request's limit of calls is reached: the rest is dropped


class ToolCallParser:
    """See the module docstring. `names`, when given, are the only functions a call may name;
    `max_calls` (1 for `parallel_tool_calls: false`) ends parsing after that many calls;
    `forced`: the output opens with the calls, without a marker (a grammar forced them)."""

    def __init__(
        self,
        fmt: Format,
        *,
        names: Collection[str] | None = None,
        max_calls: int = 0,
        forced: bool = False,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        self._fmt = fmt
        self._names = frozenset(names) if names is not None else None
        self._max = max_calls
        self._new_id = new_id
        self._state = _OPEN if forced else _START if fmt.at_start else _TEXT
        self._held = ""  # text that may be the start of a marker (or, at the start, of a call)
        self._region = ""  # raw text of the current region, for falling back to plain text
        self._region_at = 0  # the input position of the region's first character
        self._pos = 0  # characters pushed
        self._at = 0  # the input position of the character being read (read again, when text)
        self._runs: list[tuple[int, int]] = []  # input spans that went out as text, in order
        self._region_sent = False  # something of the current region has gone out
        self._in_array = False
        self._tag = ""  # the part of the end tag read so far
        self._call: CallReader | None = None
        self._named = False  # the current call's first fragment (its id and name) went out
        self._out: Output = []
        self.calls = 0  # calls completed (or closed after breaking off, or cut)

    @property
    def spent(self) -> bool:
        """The request's limit of calls is reached: the caller may stop generating."""
        return self._state == _SPENT

    @property
    def seen(self) -> int:
        """Characters pushed."""
        return self._pos

    @property
    def settled(self) -> int:
        """The pushed characters before this one are decided: text (`take_runs`) or markup (a
        call's, or dropped). Those after it are held: they may still go either way."""
        state = self._state
        if state in (_START, _TEXT):
            return self._pos - len(self._held)
        if state in (_OPEN, _CALL, _BETWEEN, _END_TAG):
            named = self._call is not None and self._call.name is not None
            if not (self._region_sent or named):
                return self._pos - len(self._region)  # the region may still turn out to be text
            if state == _END_TAG:
                return self._pos - len(self._tag)  # may not be the end tag after all
        return self._pos

    def take_runs(self) -> list[tuple[int, int]]:
        """The input spans (start, end) that went out as text since the last call, in order."""
        runs, self._runs = self._runs, []
        return runs

    def push(self, text: str) -> Output:
        for ch in text:
            self._at = self._pos
            self._pos += 1
            self._step(ch)
        self._send_arguments()
        return self._drain()

    def finish(self, *, length: bool = False) -> Output:
        """The generation ended: the model stopped, or (`length`) max_tokens cut it. Decide what
        was held (see the module docstring): release it as text, or close a call that broke
        off; after a cut, drop it, or give a named call what was generated of its arguments."""
        if self._state in (_START, _TEXT):
            if not length:
                self._text(self._held, self._pos - len(self._held))
            self._held = ""
        elif self._state in (_OPEN, _CALL):
            if length:
                self._cut_off()
            else:
                self._break_off()
        self._state = _SPENT if self._state == _SPENT else _TEXT
        return self._drain()

    # -- the state machine --------------------------------------------------------------------

    def _step(self, ch: str) -> None:
        state = self._state
        if state == _START:
            self._at_start(ch)
        elif state == _TEXT:
            self._in_text(ch)
        elif state in (_OPEN, _BETWEEN):
            self._region += ch
            self._between(ch)
        elif state == _CALL:
            self._region += ch
            self._in_call(ch)
        elif state == _END_TAG:
            self._region += ch
            self._in_end_tag(ch)
        elif state == _SKIP:
            self._skip(ch)

    def _at_start(self, ch: str) -> None:
        if ch in _WHITESPACE:
            self._held += ch
            return
        if ch == "{":
            self._region, self._held = self._held, ""
            self._region_at = self._at - len(self._region)
            self._state = _OPEN
            self._region += ch
            self._between(ch)
            return
        self._state = _TEXT
        self._in_text(ch)

    def _in_text(self, ch: str) -> None:
        held = self._held + ch
        start = self._at - len(self._held)
        marker = self._fmt.marker
        if held.endswith(marker):
            self._text(held[: -len(marker)], start)
            self._held = ""
            self._region, self._region_sent, self._in_array = marker, False, False
            self._region_at = self._at - len(marker) + 1
            self._state = _OPEN
            return
        keep = _partial_len(held, marker)
        self._text(held[: len(held) - keep], start)
        self._held = held[len(held) - keep :]

    def _between(self, ch: str) -> None:
        """After a marker or a call: whitespace, a call, a separator, the region's end."""
        fmt = self._fmt
        if ch in _WHITESPACE:
            return
        if ch == "{":
            self._call = CallReader(names=self._names, bare=self._bare(), new_id=self._new_id)
            self._named = False
            self._state = _CALL
            self._in_call(ch)
        elif ch == "[" and fmt.array and self._state == _OPEN and not self._in_array:
            self._in_array = True
        elif fmt.separator and ch == fmt.separator and self._state == _BETWEEN:
            return
        elif ch == "]" and self._in_array:
            self._end_region()
        elif fmt.end_tag and ch == fmt.end_tag[0] and self._state == _BETWEEN:
            self._tag = ch
            self._state = _END_TAG
        elif self._state == _OPEN:
            self._malformed()
        else:  # the calls are over; what follows is text
            self._end_region()
            self._in_text(ch)

    def _in_call(self, ch: str) -> None:
        call = self._call
        assert call is not None
        try:
            call.feed(ch)
        except NotACall:
            self._malformed()
            return
        if call.complete:
            self._complete_call()

    def _in_end_tag(self, ch: str) -> None:
        tag = self._tag + ch
        if self._fmt.end_tag.startswith(tag):
            self._tag = tag
            if tag == self._fmt.end_tag:
                self._end_region()
            return
        self._end_region()  # not the end tag after all: text
        at = self._at
        for i, c in enumerate(tag):
            self._at = at - len(tag) + 1 + i
            self._in_text(c)

    def _skip(self, ch: str) -> None:
        if not self._fmt.end_tag:
            return
        self._tag += ch
        if self._tag.endswith(self._fmt.end_tag):
            self._tag = ""
            self._state = _TEXT
        else:
            self._tag = self._tag[-len(self._fmt.end_tag) :]

    # -- calls --------------------------------------------------------------------------------

    def _complete_call(self) -> None:
        call = self._call
        assert call is not None
        if call.name is None:
            self._malformed()
            return
        self._head(call)
        self._arguments(call.rest())
        self._state = _BETWEEN
        self._close_call()

    def _send_arguments(self) -> None:
        """Send what is safe of the current call's arguments (once its name is out)."""
        call = self._call
        if call is None or self._state != _CALL or call.name is None:
            return
        self._head(call)
        self._arguments(call.ready())

    def _head(self, call: CallReader) -> None:
        if not self._named:
            assert call.name is not None
            self._named = True
            self._region_sent = True
            self._emit(ToolCallDelta(self.calls, id=call.id, name=call.name))

    def _arguments(self, text: str) -> None:
        if text:
            self._emit(ToolCallDelta(self.calls, arguments=text))

    def _close_call(self) -> None:
        self._call = None
        self.calls += 1
        if self._max and self.calls >= self._max:
            self._state = _SPENT

    def _break_off(self) -> None:
        """The call stopped short: close what went out, or give it all back as text."""
        call = self._call
        if call is None or call.name is None:
            if not self._region_sent:
                self._text(self._region, self._region_at)
            self._call = None
            return
        self._head(call)
        self._arguments(call.closed())
        self._close_call()

    def _cut_off(self) -> None:
        """max_tokens cut the region: a named call goes out with its arguments as generated; a
        call without its name yet, or a region without a call yet, is dropped (it is markup)."""
        call = self._call
        if call is None or call.name is None:
            self._call = None
            return
        self._head(call)
        self._arguments(call.generated())
        self._close_call()

    def _malformed(self) -> None:
        if self._region_sent or (self._call is not None and self._call.name is not None):
            self._break_off()
            if self._state != _SPENT:
                self._state, self._tag = _SKIP, ""
            return
        region, at = self._region, self._region_at
        self._call, self._region, self._state, self._held = None, "", _TEXT, ""
        # The marker (or the opening brace, for a bare call) is text; the rest is read again, as
        # text that may hold another marker (and, after one, another region: so read by `_step`).
        head = len(self._fmt.marker) if region.startswith(self._fmt.marker) else len(region) - len(region.lstrip()) + 1
        self._text(region[:head], at)
        for i, c in enumerate(region[head:]):
            self._at = at + head + i
            self._step(c)

    def _bare(self) -> bool:
        """The current call came without a marker (llama3's bare JSON at the start)."""
        return not self._region.startswith(self._fmt.marker)

    def _end_region(self) -> None:
        self._state = _TEXT if self._state != _SPENT else _SPENT
        self._region, self._region_sent, self._in_array, self._tag = "", False, False, ""

    # -- output -------------------------------------------------------------------------------

    def _text(self, text: str, start: int) -> None:
        """`text` goes out; it was read from input position `start` on."""
        if not text or self._state == _SPENT:
            return
        if self._runs and self._runs[-1][1] == start:
            self._runs[-1] = (self._runs[-1][0], start + len(text))
        else:
            self._runs.append((start, start + len(text)))
        if self._out and isinstance(self._out[-1], str):
            self._out[-1] += text
        else:
            self._out.append(text)

    def _emit(self, delta: ToolCallDelta) -> None:
        last = self._out[-1] if self._out else None
        if isinstance(last, ToolCallDelta) and last.index == delta.index and not delta.id and not delta.name:
            self._out[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + delta.arguments)
        else:
            self._out.append(delta)

    def _drain(self) -> Output:
        out, self._out = self._out, []
        return out


def _partial_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
