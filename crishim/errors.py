"""The one error hierarchy of crishim.

Every layer raises these; only ``crishim.api`` turns them into gRPC statuses, once, at the
edge. Each error's message names what it is about (an id, a path, a key).

    CrishimError
    ├── NotFound             the object asked for does not exist
    ├── AlreadyExists        a name or id is taken
    ├── InvalidArgument      the request itself is wrong
    ├── FailedPrecondition   the object is in a state that forbids the call
    ├── Unavailable          a dependency is down or crishim is shutting down
    ├── DeadlineExceeded     an operation ran out of time
    ├── Unimplemented        the call or option is not supported
    ├── Unauthenticated      a registry refused the credentials (or their absence)
    ├── DataLoss             content did not match its digest or size
    ├── ResourceExhausted    the disk (or a quota) is full
    ├── ConfigError          the configuration is invalid (raised at start, not over gRPC)
    └── Internal             a bug or an unexpected failure of the host
"""

from __future__ import annotations


class CrishimError(Exception):
    """Base of every error crishim raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(CrishimError):
    """The object asked for does not exist."""


class AlreadyExists(CrishimError):
    """A name or id is already taken."""


class InvalidArgument(CrishimError):
    """The request is malformed or names something impossible."""


class FailedPrecondition(CrishimError):
    """The object's state forbids the call (for example, starting an exited container)."""


class Unavailable(CrishimError):
    """A dependency is not reachable, or crishim is shutting down."""


class DeadlineExceeded(CrishimError):
    """An operation did not finish in time."""


class Unimplemented(CrishimError):
    """The call or one of its options is not supported."""


class Unauthenticated(CrishimError):
    """A registry refused the credentials given, or demands some and none were given."""


class DataLoss(CrishimError):
    """Content does not match its digest or declared size (corrupt or truncated)."""


class ResourceExhausted(CrishimError):
    """The disk (or a quota) is full; the message names the path being written."""


class ConfigError(CrishimError):
    """The configuration is invalid; the message names the file, the key and the problem."""


class Internal(CrishimError):
    """An unexpected failure: a bug, or the host misbehaving."""
