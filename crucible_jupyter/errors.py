"""One exception tree for crucible_jupyter, mapped once to HTTP status codes.

::

    CrucibleError                     base of everything this package raises on purpose (500)
    ├── InvalidRequest                the request is malformed or out of bounds (400)
    │   ├── RequestTooLarge           the code or the environment is over its size limit (413)
    │   └── UnsupportedLanguage       the language is not one this dispatcher runs (422)
    ├── NotFound                      no execution with that id (404)
    ├── Forbidden                     the caller may not see or change that execution (403)
    ├── Conflict                      the execution is in a state that forbids the action (409)
    ├── TooManyQueued                 the user has as many executions queued as allowed (429)
    ├── Unavailable                   the dispatcher or a backend cannot take work now (503)
    └── StorageError                  the database failed (503)

Every message is written for the person who sent the request: it says what was wrong
and how to fix it.
"""

from __future__ import annotations


class CrucibleError(Exception):
    """Base class of every error crucible_jupyter raises on purpose."""

    status_code = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        """A JSON-ready description: ``{"error": kind, "message": ..., "field": ...}``."""
        out = {"error": type(self).__name__, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class InvalidRequest(CrucibleError):
    """The request is malformed or a value is out of its allowed range."""

    status_code = 400


class RequestTooLarge(InvalidRequest):
    """The code or another part of the request is larger than the configured limit."""

    status_code = 413


class UnsupportedLanguage(InvalidRequest):
    """The request asks for a language this dispatcher does not run."""

    status_code = 422


class NotFound(CrucibleError):
    """No execution has the given id."""

    status_code = 404


class Forbidden(CrucibleError):
    """The caller is not allowed to see or change the execution."""

    status_code = 403


class Conflict(CrucibleError):
    """The execution's state forbids the action (for example, cancelling a finished one)."""

    status_code = 409


class TooManyQueued(CrucibleError):
    """The caller already has as many executions waiting as one user may; the message says
    how many and what to do (wait, or cancel some)."""

    status_code = 429


class Unavailable(CrucibleError):
    """The dispatcher or its backend cannot accept work right now."""

    status_code = 503


class StorageError(Unavailable):
    """The database could not be read or written."""


def http_status(error: BaseException) -> int:
    """The HTTP status code for ``error``: its own for a CrucibleError, else 500."""
    return getattr(error, "status_code", 500) if isinstance(error, CrucibleError) else 500
