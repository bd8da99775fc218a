"""Tools on own nodes: which tool-call markup a model's chat template uses, what a request asks of
it (`ToolPlan`), and the request's history in the shape chat templates expect.

Pure functions over the request and the tokenizer's template text; no torch.

    fmt = detect_format(tokenizer, "auto")       # from the template source, or a --tool-parser
    plan = plan_tools(request, fmt)              # raises a 400-class error for what cannot be done
    messages = template_messages(request, fmt)   # OpenAI history -> template messages
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from typing import Any

from schemas.chat import message_text
from schemas.errors import InvalidRequestError, UnsupportedError
from worker.toolformats import FORMATS, Format

TOOL_PARSERS = ("auto", "hermes", "llama3", "mistral", "none")
_BASE62 = string.digits + string.ascii_letters


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's tools mean for one generation."""

    tools: tuple[dict[str, Any], ...] = ()  # rendered into the prompt; empty: none
    fmt: Format | None = None  # parse the output for calls in this markup; None: plain text
    names: frozenset[str] = frozenset()
    max_calls: int = 0  # 0: any number
    forced: tuple[dict[str, Any], ...] = ()  # the model must call one of these (grammar-forced)

    @property
    def parallel(self) -> bool:
        return self.max_calls != 1


def template_source(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the tool-use one if there is one
        return str(template.get("tool_use") or template.get("default") or "")
    return str(template or "")


def detect_format(tokenizer: Any, setting: str = "auto") -> Format | None:
    """The tool-call markup of this model: by the setting, or read from its chat template (a
    template that takes `tools` and shows one of the known markers). None: no tools."""
    if setting == "none":
        return None
    if setting != "auto":
        return FORMATS[setting]
    source = template_source(tokenizer)
    if "tools" not in source:
        return None
    if "<tool_call>" in source:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in source:
        return FORMATS["mistral"]
    if "<|python_tag|>" in source or "ipython" in source:
        return FORMATS["llama3"]
    return None


def markup_tokens(tokenizer: Any, fmt: Format | None) -> dict[int, str]:
    """Special tokens that are tool-call markup (decoding skips special tokens, so the parser
    gets these as text instead): llama3's <|python_tag|>, mistral's [TOOL_CALLS]."""
    if fmt is None:
        return {}
    token = tokenizer.convert_tokens_to_ids(fmt.marker)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    is_special = token in special or bool(getattr(added.get(token), "special", False))
    if isinstance(token, int) and token != tokenizer.unk_token_id and is_special:
        return {token: fmt.marker}
    return {}


def plan_tools(request: dict[str, Any], fmt: Format | None) -> ToolPlan:
    """Read `tools`, `tool_choice` and `parallel_tool_calls` against what the model can do."""
    tools = tuple(t for t in request.get("tools") or () if t.get("type", "function") == "function")
    choice = request.get("tool_choice")
    if not tools:
        if isinstance(choice, dict) or choice == "required":
            raise InvalidRequestError("tool_choice requires tools to be given.", param="tool_choice")
        return ToolPlan()
    if choice == "none":
        return ToolPlan()
    if fmt is None:
        raise UnsupportedError("This model does not support tools.", param="tools")
    names = frozenset(str((t.get("function") or {}).get("name", "")) for t in tools)
    max_calls = 1 if request.get("parallel_tool_calls") is False else 0
    if choice in (None, "auto"):
        return ToolPlan(tools, fmt, names, max_calls)
    if choice == "required":
        return ToolPlan(tools, fmt, names, max_calls, forced=tools)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        forced = tuple(t for t in tools if (t.get("function") or {}).get("name") == name)
        if not forced:
            raise InvalidRequestError(
                f"tool_choice names the function '{name}', which is not in tools.", param="tool_choice"
            )
        return ToolPlan(tools, fmt, frozenset({str(name)}), 1, forced=forced[:1])
    raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required' or a function.", param="tool_choice")


def template_messages(request: dict[str, Any], fmt: Format | None) -> list[dict[str, Any]]:
    """The request's messages as chat templates take them: text content; an assistant's
    `tool_calls` with their arguments as objects; a tool result with its function's name."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in request["messages"]:
        message: dict[str, Any] = {"role": m["role"], "content": message_text(m.get("content"))}
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = call.get("function") or {}
                names[call.get("id", "")] = function.get("name", "")
                calls.append(
                    {
                        "id": _call_id(call.get("id", ""), fmt),
                        "type": "function",
                        "function": {"name": function.get("name", ""), "arguments": _arguments(function)},
                    }
                )
            message["tool_calls"] = calls
        elif m["role"] == "tool":
            message["tool_call_id"] = _call_id(m.get("tool_call_id", ""), fmt)
            message["name"] = names.get(m.get("tool_call_id", ""), "")
        out.append(message)
    return out


def _arguments(function: dict[str, Any]) -> Any:
    """Templates write `arguments | tojson`: give them the object, not its JSON text."""
    raw = function.get("arguments", "")
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return raw


def _call_id(call_id: str, fmt: Format | None) -> str:
    """Mistral's templates insist on 9 alphanumerics: map ours onto such ids, the same each time."""
    if fmt is None or fmt.name != "mistral" or (len(call_id) == 9 and call_id.isalnum()):
        return call_id
    n = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    return "".join(_BASE62[(n >> (6 * i)) % 62] for i in range(9))
