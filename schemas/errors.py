"""The error tree. Each error knows its OpenAI `type`, `code` and HTTP status.

    TokenyardError                      500 server_error
    ├── InvalidRequestError             400 invalid_request_error
    │   ├── ContextLengthError          400 code=context_length_exceeded
    │   └── UnsupportedError            400 code=unsupported_parameter / unsupported_value
    ├── AuthenticationError             401 code=invalid_api_key
    ├── PermissionDeniedError           403
    ├── NotFoundError                   404
    │   └── ModelNotFoundError          404 code=model_not_found
    ├── MethodNotAllowedError           405
    ├── RequestTooLargeError            413
    ├── RateLimitError                  429 (retry_after)
    │   └── QueueFullError              429 code=queue_full
    ├── WorkerFailedError               502 (every attempt failed, poison job)
    ├── NoCapacityError                 503 code=no_capacity (retry_after)
    └── DeadlineExceededError           504 code=timeout

Errors cross the wire as data (`to_wire` / `from_wire`) and reach HTTP clients as OpenAI's
error object (`body`).
"""

from __future__ import annotations

from typing import Any, ClassVar


class TokenyardError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"kind": type(self).__name__, "message": self.message}
        if self.param is not None:
            wire["param"] = self.param
        if self.code is not None:
            wire["code"] = self.code
        if self.retry_after is not None:
            wire["retry_after"] = self.retry_after
        return wire


class InvalidRequestError(TokenyardError):
    status = 400
    type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    default_code = "context_length_exceeded"


class UnsupportedError(InvalidRequestError):
    default_code = "unsupported_parameter"


class AuthenticationError(TokenyardError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(TokenyardError):
    status = 403
    type = "invalid_request_error"
    default_code = "permission_denied"


class NotFoundError(TokenyardError):
    status = 404
    type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class MethodNotAllowedError(TokenyardError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTooLargeError(TokenyardError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimitError(TokenyardError):
    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"


class QueueFullError(RateLimitError):
    default_code = "queue_full"


class WorkerFailedError(TokenyardError):
    status = 502
    type = "server_error"
    default_code = "worker_failed"


class NoCapacityError(TokenyardError):
    status = 503
    type = "server_error"
    default_code = "no_capacity"


class DeadlineExceededError(TokenyardError):
    status = 504
    type = "server_error"
    default_code = "timeout"


_BY_NAME: dict[str, type[TokenyardError]] = {}


def _register(cls: type[TokenyardError]) -> None:
    _BY_NAME[cls.__name__] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(TokenyardError)


def from_wire(wire: dict[str, Any]) -> TokenyardError:
    """Rebuild an error sent by another process; an unknown kind becomes a plain server error."""
    cls = _BY_NAME.get(str(wire.get("kind")), TokenyardError)
    retry = wire.get("retry_after")
    return cls(
        str(wire.get("message", "unknown error")),
        param=wire.get("param"),
        code=wire.get("code"),
        retry_after=float(retry) if retry is not None else None,
    )
