"""Turning pydantic's validation errors into OpenAI's 400: which parameter, and why."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from schemas.errors import InvalidRequestError

M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], body: Any) -> M:
    """Validate a decoded JSON body; any problem becomes an InvalidRequestError naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise invalid_request(e) from e


def invalid_request(e: ValidationError) -> InvalidRequestError:
    # In a union, the branch that got furthest names the real problem.
    first = max(e.errors(include_url=False), key=lambda err: len(err["loc"]))
    param = _param_path(first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    if first["type"] == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if first["type"] == "extra_forbidden":
        return InvalidRequestError(
            f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    if param:
        return InvalidRequestError(f"Invalid value for '{param}': {msg}", param=param, code="invalid_value")
    return InvalidRequestError(msg, code="invalid_value")


_UNION_TAGS = frozenset({"system", "developer", "user", "assistant", "tool", "str", "function-after"})


def _param_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in _UNION_TAGS or not str(item).isidentifier():
            continue  # union branch names pydantic adds to the location
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)
