"""Domain errors: one base exception, specific subclasses that name the bad value and what is allowed."""

from __future__ import annotations


class PersonaError(Exception):
    """Base of every error persona raises on purpose."""


class NotFound(PersonaError):
    """A named thing (application, user, revision) does not exist."""


class Conflict(PersonaError):
    """A write lost a race or would break a uniqueness or compare-and-swap rule."""


class Unauthorized(PersonaError):
    """A caller did not present a valid credential."""


class InvalidInput(PersonaError):
    """Operator or client input is not acceptable; the message says what is allowed."""
