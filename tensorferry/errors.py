"""Every error tensorferry raises, and the one mapping between them and gRPC status codes.

    TensorferryError
    ├── DaemonNotRunning        UNAVAILABLE        (client side: nothing listens on the socket)
    ├── DaemonUnavailable       UNAVAILABLE        (the daemon went away or is shutting down)
    ├── StoreUnavailable        UNAVAILABLE        (the object store failed or misbehaved)
    ├── SourceNotAllowed        PERMISSION_DENIED  (URI outside the daemon's allowlist)
    ├── AccessDenied            PERMISSION_DENIED  (the store refused our credentials)
    ├── LeaseNotOwned           PERMISSION_DENIED  (Release of another process's lease)
    ├── SourceNotFound          NOT_FOUND          (bucket, key or directory missing)
    ├── ModelNotFound           NOT_FOUND          (no resident model by that id or URI)
    ├── InvalidRequest          INVALID_ARGUMENT   (malformed URI, device, ...)
    ├── InvalidArtifact         INVALID_ARGUMENT   (not safetensors, unknown dtype, ...)
    ├── ConfigError             INVALID_ARGUMENT   (a config file or value; never crosses gRPC)
    ├── ResourceExhausted       RESOURCE_EXHAUSTED (memory budget)
    ├── FailedPrecondition      FAILED_PRECONDITION
    ├── SourceChanged           ABORTED            (an object was replaced mid-load)
    ├── ModelEvicted            ABORTED            (evicted while the request waited for it)
    ├── DataLoss                DATA_LOSS          (corrupt bytes at rest)
    └── InternalError           INTERNAL

The daemon sends the class name in trailing metadata so the client re-raises the same type.
"""

from __future__ import annotations

from typing import Any

import grpc

ERROR_KIND_KEY = "tensorferry-error"


class TensorferryError(Exception):
    """Base class; ``code`` is the gRPC status the daemon answers with."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DaemonNotRunning(TensorferryError):
    code = grpc.StatusCode.UNAVAILABLE


class DaemonUnavailable(TensorferryError):
    code = grpc.StatusCode.UNAVAILABLE


class StoreUnavailable(TensorferryError):
    code = grpc.StatusCode.UNAVAILABLE


class SourceNotAllowed(TensorferryError):
    code = grpc.StatusCode.PERMISSION_DENIED


class AccessDenied(TensorferryError):
    code = grpc.StatusCode.PERMISSION_DENIED


class LeaseNotOwned(TensorferryError):
    code = grpc.StatusCode.PERMISSION_DENIED


class SourceNotFound(TensorferryError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(TensorferryError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidRequest(TensorferryError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidArtifact(TensorferryError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ConfigError(TensorferryError, ValueError):
    """A configuration value is invalid; the message names the key and the rule.

    Still a ValueError, as it was before it joined this hierarchy, for callers that catch
    that. Raised at start or by a CLI command, so it has no place in the status mapping.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(TensorferryError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(TensorferryError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class SourceChanged(TensorferryError):
    code = grpc.StatusCode.ABORTED


class ModelEvicted(TensorferryError):
    code = grpc.StatusCode.ABORTED


class DataLoss(TensorferryError):
    code = grpc.StatusCode.DATA_LOSS


class InternalError(TensorferryError):
    code = grpc.StatusCode.INTERNAL


_BY_NAME: dict[str, type[TensorferryError]] = {
    cls.__name__: cls
    for cls in (
        DaemonNotRunning, DaemonUnavailable, StoreUnavailable, SourceNotAllowed, AccessDenied,
        LeaseNotOwned, SourceNotFound, ModelNotFound, InvalidRequest, InvalidArtifact,
        ResourceExhausted, FailedPrecondition, SourceChanged, ModelEvicted, DataLoss, InternalError,
    )
}  # fmt: skip

_BY_CODE: dict[grpc.StatusCode, type[TensorferryError]] = {
    grpc.StatusCode.UNAVAILABLE: DaemonUnavailable,
    grpc.StatusCode.PERMISSION_DENIED: AccessDenied,
    grpc.StatusCode.NOT_FOUND: SourceNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.ABORTED: SourceChanged,
}


#: Characters of user input an error message quotes.
QUOTE_LIMIT = 200
#: Bytes of a status detail once percent-encoded for its header. gRPC clients refuse
#: metadata over 8-16 KiB and report that instead of our error.
MAX_DETAILS = 4096


def quote(value: object, *, limit: int = QUOTE_LIMIT, bare: bool = False) -> str:
    """``repr(value)`` for an error message (``bare``: a string as it is), cut after
    ``limit`` characters.

    Requests carry megabytes of URI or name, and headers megabytes of shape or name: an
    error that echoes them whole is as big, in every log line and status detail.
    """
    if isinstance(value, str):
        shown = value[:limit] if bare else repr(value[:limit])
        return shown if len(value) <= limit else f"{shown}... ({len(value)} characters)"
    try:
        text = repr(value)
    except RecursionError:  # a list from JSON nested a thousand deep
        return f"<a {type(value).__name__} nested too deeply to show>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _encoded_size(text: str) -> int:
    # grpc-message is percent-encoded: printable ASCII but "%" passes, every other byte
    # becomes %XX.
    if text.isascii() and text.isprintable():
        return len(text) + 2 * text.count("%")
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in text.encode())


def cap_details(details: str) -> str:
    """``details`` cut to fit :data:`MAX_DETAILS`; the backstop for messages that quote
    user input without :func:`quote`."""
    if len(details) <= MAX_DETAILS and _encoded_size(details) <= MAX_DETAILS:
        return details
    suffix = f"... (status detail cut: {len(details)} characters)"
    budget = MAX_DETAILS - len(suffix)
    end = 0
    for char in details:
        budget -= _encoded_size(char)
        if budget < 0:
            break
        end += 1
    return details[:end] + suffix


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Status code, details and trailing metadata for an exception leaving an RPC handler."""
    if isinstance(exc, TensorferryError):
        return exc.code, cap_details(exc.message), ((ERROR_KIND_KEY, type(exc).__name__),)
    return (
        grpc.StatusCode.INTERNAL,
        cap_details(
            f"internal error in the tensorferry daemon: {type(exc).__name__}: {exc} "
            "(see the daemon's log)"
        ),
        ((ERROR_KIND_KEY, "InternalError"),),
    )


def from_rpc_error(err: grpc.RpcError, socket: str) -> TensorferryError:
    """The client-side exception for a failed call."""
    call: Any = err  # RpcErrors raised by calls are also grpc.Call objects
    code: grpc.StatusCode = call.code()
    details: str = call.details() or ""
    kind = None
    for key, value in call.trailing_metadata() or ():
        if key == ERROR_KIND_KEY:
            kind = str(value)
    if kind is not None and kind in _BY_NAME:
        return _BY_NAME[kind](details)
    if code == grpc.StatusCode.UNAVAILABLE and kind is None:
        return daemon_not_running(socket, details)
    if code == grpc.StatusCode.CANCELLED:
        return DaemonUnavailable(f"the call to the tensorferry daemon was cancelled: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DaemonUnavailable(f"the tensorferry daemon did not answer in time: {details}")
    return _BY_CODE.get(code, InternalError)(details or str(code))


def daemon_not_running(socket: str, details: str = "") -> DaemonNotRunning:
    suffix = f" ({details})" if details else ""
    return DaemonNotRunning(
        f"tensorferry daemon is not running at {socket}: start it with "
        f"`tensorferry serve --socket {socket}` (or `systemctl start tensorferryd`), "
        f"or point TENSORFERRY_SOCKET at a running daemon's socket{suffix}"
    )
