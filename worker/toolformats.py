"""The tool-call markups models write, as data: what opens a region of calls, what closes one,
what separates the calls in it, and whether a call may come bare.

    hermes   (Qwen2.5, Hermes, many fine-tunes)  <tool_call>{"name": "f", "arguments": {...}}</tool_call>
    llama3   (Llama 3.1-3.3)                     {"name": "f", "parameters": {...}}  at the start of
                                                 the answer, or after <|python_tag|>; several joined by ';'
    mistral  (Mistral, Mixtral)                  [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]

`worker.engine_tools` picks one from a model's chat template, `worker.grammar` forces calls in
it, `worker.toolcalls` reads calls out of a model's text in it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Format:
    name: str
    marker: str  # text that opens a region of calls
    end_tag: str = ""  # text that closes one (hermes)
    at_start: bool = False  # a bare JSON call may open the answer (llama3)
    separator: str = ""  # between calls of one region
    array: bool = False  # a region may hold a JSON array of calls (mistral)


FORMATS: dict[str, Format] = {
    "hermes": Format("hermes", "<tool_call>", end_tag="</tool_call>"),
    "llama3": Format("llama3", "<|python_tag|>", at_start=True, separator=";"),
    "mistral": Format("mistral", "[TOOL_CALLS]", separator=",", array=True),
}
