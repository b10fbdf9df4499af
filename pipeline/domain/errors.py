"""The exception tree: one base (`PersonaError`), a few categories, and each package's errors under a category.

A category says what went wrong from the caller's side, and so how an HTTP API answers it (each class carries its
``http_status`` and OpenAI-style ``code``; `error_body` renders the body). The APIs map errors in one place, by
these attributes: a new error only has to pick its category.

=====================  ======  ==============================================================================
category               status  meaning
=====================  ======  ==============================================================================
`InvalidInput`         400     the request (or operator input) is not acceptable; the message says what is
`AdapterNotServable`   422     the named adapter exists but this serving worker cannot load it (its limits)
`Unauthorized`         401     no valid credential
`NotFound`             404     the named application, user, revision or object does not exist
`Conflict`             409     a write lost a race or would break a uniqueness or compare-and-swap rule
`CapacityExhausted`    429     a bounded resource (device slots) is full right now; retry after a moment
`Unavailable`          503     a dependency (database, object store, broker) failed or is unreachable
`PersonaError` itself  500     anything else raised on purpose; an unexpected exception is a bug (also 500)
=====================  ======  ==============================================================================
"""

from __future__ import annotations

from typing import Any, ClassVar


class PersonaError(Exception):
    """Base of every error persona raises on purpose. ``param`` names the input field at fault, when one is."""

    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    #: Seconds a client should wait before retrying (the Retry-After header), when a retry can help; a class default
    #: that one error may override (``retry_after_s=`` at construction).
    retry_after_s: float | None = None

    def __init__(self, message: str = "", *, param: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.param = param
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses process boundaries (a serving worker's fill and HTTP processes) with its param and retry hint; the
        # default (the class called with ``args``) would drop both.
        return _rebuild, (type(self), str(self), self.param, self.__dict__.get("retry_after_s"))


def _rebuild(cls: type[PersonaError], message: str, param: str | None, retry_after_s: float | None) -> PersonaError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.param = param
    if retry_after_s is not None:
        error.retry_after_s = retry_after_s
    return error


class InvalidInput(PersonaError):
    """Operator or client input is not acceptable; the message says what is allowed."""

    http_status = 400
    code = "invalid_request"


class AdapterNotServable(InvalidInput):
    """An adapter does not fit what a serving worker can hold (rank, target modules, LoRA features)."""

    http_status = 422
    code = "adapter_not_servable"


class Unauthorized(PersonaError):
    """A caller did not present a valid credential."""

    http_status = 401
    code = "invalid_api_key"


class Forbidden(PersonaError):
    """A valid credential that does not carry the scope the action needs."""

    http_status = 403
    code = "insufficient_scope"


class NotFound(PersonaError):
    """A named thing (application, user, revision, object) does not exist."""

    http_status = 404
    code = "not_found"


class Forgotten(NotFound):
    """The user was forgotten (a tombstone exists) while this work was running: it writes nothing. Outside the
    process it reads like any unknown user."""

    code = "user_forgotten"


class Conflict(PersonaError):
    """A write lost a race or would break a uniqueness or compare-and-swap rule."""

    http_status = 409
    code = "conflict"


class CapacityExhausted(PersonaError):
    """A bounded resource is full right now (e.g. every device slot holds an adapter in use); retry shortly."""

    http_status = 429
    code = "capacity_exhausted"
    retry_after_s: float | None = 1.0


class Unavailable(PersonaError):
    """A dependency (database, object store, broker) failed or could not be reached; retrying later may help."""

    http_status = 503
    code = "dependency_unavailable"
    retry_after_s: float | None = 1.0


def error_body(
    status: int, code: str, message: str, param: str | None = None, **extra: Any
) -> dict[str, dict[str, Any]]:
    """The OpenAI-shaped error body: ``{"error": {"message", "type", "param", "code"}}`` (plus ``extra`` fields);
    ``type`` is ``invalid_request_error`` below 500 (as OpenAI's, 401 and 429 included), else ``server_error``."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code, **extra}}


def body_of(error: PersonaError) -> dict[str, dict[str, Any]]:
    """`error_body` of a raised error, from its class's status and code."""
    return error_body(error.http_status, error.code, str(error), error.param)
