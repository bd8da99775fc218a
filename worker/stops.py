"""Stop sequences matched on generated text, across token boundaries, without leaking them.

Pure string logic, no torch. A `StopScanner` is fed text as it is detokenized and returns only
what is safe to send: text that precedes a stop sequence, minus the longest tail that could still
grow into one. When a stop sequence appears, everything from its start on is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop sequence in `text` starts, or -1 if none occurs."""
    first = -1
    for stop in stops:
        if not stop:
            continue
        at = text.find(stop)
        if at != -1 and (first == -1 or at < first):
            first = at
    return first


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop sequence."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def split_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split pending text into (safe to emit, held back, stop found).

    If a stop sequence occurs, the safe part is the text before it and nothing is held back.
    """
    at = find_stop(text, stops)
    if at != -1:
        return text[:at], "", True
    hold = partial_stop_len(text, stops)
    if hold == 0:
        return text, "", False
    return text[:-hold], text[-hold:], False


class StopScanner:
    """Feeds text through `split_stop`, carrying the held-back tail between calls."""

    __slots__ = ("_stops", "_held", "stopped")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text safe to emit now; sets `stopped` once a stop sequence has been seen."""
        if self.stopped or not text:
            return ""
        if not self._stops:
            return text
        safe, self._held, self.stopped = split_stop(self._held + text, self._stops)
        return safe

    def flush(self) -> str:
        """At the end of generation without a stop: the held-back tail is plain text after all."""
        if self.stopped:
            return ""
        held, self._held = self._held, ""
        return held
