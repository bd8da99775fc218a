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
    ├── RequestTimeoutError             408 code=request_timeout (the body did not arrive in time)
    ├── RequestTooLargeError            413
    ├── HeadersTooLargeError            431 (the request's headers)
    ├── RateLimitError                  429 (retry_after)
    │   └── QueueFullError              429 code=queue_full
    ├── WorkerFailedError               502 (every attempt failed, poison job)
    ├── NoCapacityError                 503 code=no_capacity (retry_after)
    │   ├── ContentionError             503 code=contention (limit counters too contended)
    │   └── ContinuationUnavailableError 503 code=continuation_unavailable (no route takes the prefix)
    ├── UnavailableError                503 code=unavailable (retry_after: NATS/JetStream cannot take it now)
    └── DeadlineExceededError           504 code=timeout

Errors cross the wire as data (`to_wire` / `from_wire`) and reach HTTP clients as OpenAI's
error object (`body`). On the wire an error is named by its class's stable `wire` name, never
its Python class name, and carries its status: a peer that does not know the name (an older
or newer version) still answers with the right status (`from_wire`).
"""

from __future__ import annotations

from typing import Any, ClassVar


class TokenyardError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    wire: ClassVar[str] = "server"  # the stable name on the wire; unique per class

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
        wire: dict[str, Any] = {"kind": self.wire, "status": self.status, "message": self.message}
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
    wire = "invalid_request"


class ContextLengthError(InvalidRequestError):
    default_code = "context_length_exceeded"
    wire = "context_length"


class UnsupportedError(InvalidRequestError):
    default_code = "unsupported_parameter"
    wire = "unsupported"


class AuthenticationError(TokenyardError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"
    wire = "authentication"


class PermissionDeniedError(TokenyardError):
    status = 403
    type = "invalid_request_error"
    default_code = "permission_denied"
    wire = "permission_denied"


class NotFoundError(TokenyardError):
    status = 404
    type = "invalid_request_error"
    wire = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"
    wire = "model_not_found"


class MethodNotAllowedError(TokenyardError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"
    wire = "method_not_allowed"


class RequestTimeoutError(TokenyardError):
    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"
    wire = "request_timeout"


class RequestTooLargeError(TokenyardError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"
    wire = "too_large"


class HeadersTooLargeError(TokenyardError):
    status = 431
    type = "invalid_request_error"
    default_code = "request_header_fields_too_large"
    wire = "headers_too_large"


class RateLimitError(TokenyardError):
    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"
    wire = "rate_limit"


class QueueFullError(RateLimitError):
    default_code = "queue_full"
    wire = "queue_full"


class WorkerFailedError(TokenyardError):
    status = 502
    type = "server_error"
    default_code = "worker_failed"
    wire = "worker_failed"


class NoCapacityError(TokenyardError):
    status = 503
    type = "server_error"
    default_code = "no_capacity"
    wire = "no_capacity"


class ContentionError(NoCapacityError):
    """Shared limit counters kept changing under a compare-and-set: retry shortly."""

    default_code = "contention"
    wire = "contention"


class ContinuationUnavailableError(NoCapacityError):
    """No usable route accepts an interrupted answer's text as an assistant prefix. The gateway
    never shows this to the client: it ends the stream with what really failed."""

    default_code = "continuation_unavailable"
    wire = "continuation_unavailable"


class UnavailableError(TokenyardError):
    """The shared state (a JetStream stream or KV bucket) cannot take the operation right now:
    no quorum, no leader, a timeout. Nothing was changed that the caller must undo; retry
    after `retry_after` seconds."""

    status = 503
    type = "server_error"
    default_code = "unavailable"
    wire = "unavailable"


class DeadlineExceededError(TokenyardError):
    status = 504
    type = "server_error"
    default_code = "timeout"
    wire = "deadline"


_BY_WIRE: dict[str, type[TokenyardError]] = {}
_BY_STATUS: dict[int, type[TokenyardError]] = {}


def _register(cls: type[TokenyardError]) -> None:
    if cls.wire in _BY_WIRE:
        raise TypeError(f"two errors share the wire name {cls.wire!r}")
    _BY_WIRE[cls.wire] = cls
    _BY_STATUS.setdefault(cls.status, cls)  # the most general class of each status
    for sub in cls.__subclasses__():
        _register(sub)


_register(TokenyardError)


def from_wire(wire: dict[str, Any]) -> TokenyardError:
    """Rebuild an error sent by another process. An unknown name becomes the most general error
    of the status it carried (a server error if it carried none)."""
    cls = _BY_WIRE.get(str(wire.get("kind")))
    if cls is None:
        status = wire.get("status")
        cls = _BY_STATUS.get(status, TokenyardError) if isinstance(status, int) else TokenyardError
    retry = wire.get("retry_after")
    param, code = wire.get("param"), wire.get("code")
    return cls(
        str(wire.get("message", "unknown error")),
        param=param if isinstance(param, str) else None,
        code=code if isinstance(code, str) else None,
        retry_after=float(retry) if isinstance(retry, (int, float)) and not isinstance(retry, bool) else None,
    )
