"""Domain errors shared by every Anvil service.

Service code raises these (never grpc status codes directly); `protos.rpc` maps each to one gRPC
status, and the REST gateway maps them to HTTP. The message must say what to fix, naming the field.
A handler that raises one of these must not have changed any state.
"""

from __future__ import annotations


class AnvilError(Exception):
    """Base of the errors a client can act on; subclasses fix the status they map to."""


class InvalidArgument(AnvilError):
    """The request is malformed or out of range; the message names the field and the fix."""


class NotFound(AnvilError):
    """A named thing (session, checkpoint, model, run) does not exist."""


class AlreadyExists(AnvilError):
    """The request would overwrite something it was not allowed to overwrite."""


class FailedPrecondition(AnvilError):
    """The request is valid but arrives in the wrong state or order (e.g. commit without begin)."""


class Unauthenticated(AnvilError):
    """No API key, or the wrong one."""


class DeadlineExceeded(AnvilError):
    """Something the request waited for did not happen in time (e.g. a missing earlier seq_id)."""


class Unavailable(AnvilError):
    """A peer service could not be reached; retrying later may succeed."""


class ResourceExhausted(AnvilError):
    """No capacity is free for the request (sessions, memory)."""
