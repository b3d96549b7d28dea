"""Typed errors for the whole project. Each carries a ``code`` naming the gRPC status it maps to;
the mapping to ``grpc.StatusCode`` happens in one place (``server/edge/errors.py``), so nothing below
the gRPC edge imports grpc. Messages say what and where, in one line."""
from __future__ import annotations


class DeltaServeError(Exception):
    code = "INTERNAL"

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds; sent as a retry hint with RESOURCE_EXHAUSTED


class InvalidArgument(DeltaServeError, ValueError):
    code = "INVALID_ARGUMENT"


class DeltaError(InvalidArgument):
    """A delta that cannot be built or served faithfully (bad shapes, NaN, unknown module, ...)."""


class UnsupportedDelta(DeltaError):
    """A delta method that cannot be served faithfully (DoRA, gated adapters, prefix tuning, ...)."""


class BaseMismatch(DeltaServeError):
    """The delta was made for another base model."""
    code = "FAILED_PRECONDITION"


class FailedPrecondition(DeltaServeError):
    code = "FAILED_PRECONDITION"


class NotFound(DeltaServeError, KeyError):
    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(DeltaServeError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(DeltaServeError):
    """Quota, rate limit, concurrency cap or a full queue; ``retry_after`` says when to retry."""
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(DeltaServeError):
    code = "UNAUTHENTICATED"


class PermissionDenied(DeltaServeError):
    code = "PERMISSION_DENIED"


class DeadlineExceeded(DeltaServeError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(DeltaServeError):
    code = "CANCELLED"


class CorruptBlob(DeltaServeError):
    """A stored blob whose bytes no longer match its digest: refused, never served."""
    code = "DATA_LOSS"


class Unavailable(DeltaServeError):
    code = "UNAVAILABLE"


def error_for_code(code: str | None, message: str) -> DeltaServeError:
    """A typed error of the given code name (e.g. carried across a queue as a string); INTERNAL if unknown."""
    for cls in (InvalidArgument, FailedPrecondition, NotFound, AlreadyExists, ResourceExhausted, Unauthenticated,
                PermissionDenied, DeadlineExceeded, Cancelled, CorruptBlob, Unavailable):
        if cls.code == code:
            return cls(message)
    return DeltaServeError(message)
