"""VM runtime errors; each carries the HTTP status the API answers with."""

from __future__ import annotations


class VMError(Exception):
    status = 400


class VMNotFound(VMError):
    status = 404


class VMConflict(VMError):
    """The VM exists already, or is in the wrong state for the operation."""

    status = 409


class InsufficientSpace(VMError):
    """No room for the RAM file under the state dir."""

    status = 507


class VMStartError(VMError):
    """QEMU refused to start or died while starting; the message holds its stderr."""

    status = 500
