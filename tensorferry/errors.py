"""Every error tensorferry raises, and the one mapping between them and gRPC status codes.

    TensorferryError
    ├── DaemonNotRunning        UNAVAILABLE        (client side: nothing listens on the socket)
    ├── DaemonUnavailable       UNAVAILABLE        (the daemon went away or is shutting down)
    ├── StoreUnavailable        UNAVAILABLE        (the object store failed or misbehaved)
    ├── SourceNotAllowed        PERMISSION_DENIED  (URI outside the daemon's allowlist)
    ├── AccessDenied            PERMISSION_DENIED  (the store refused our credentials)
    ├── SourceNotFound          NOT_FOUND          (bucket, key or directory missing)
    ├── ModelNotFound           NOT_FOUND          (no resident model by that id or URI)
    ├── InvalidRequest          INVALID_ARGUMENT   (malformed URI, device, ...)
    ├── InvalidArtifact         INVALID_ARGUMENT   (not safetensors, unknown dtype, ...)
    ├── ResourceExhausted       RESOURCE_EXHAUSTED (memory budget)
    ├── FailedPrecondition      FAILED_PRECONDITION
    ├── SourceChanged           ABORTED            (an object was replaced mid-load)
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


class SourceNotFound(TensorferryError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotFound(TensorferryError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidRequest(TensorferryError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidArtifact(TensorferryError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(TensorferryError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(TensorferryError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class SourceChanged(TensorferryError):
    code = grpc.StatusCode.ABORTED


class DataLoss(TensorferryError):
    code = grpc.StatusCode.DATA_LOSS


class InternalError(TensorferryError):
    code = grpc.StatusCode.INTERNAL


_BY_NAME: dict[str, type[TensorferryError]] = {
    cls.__name__: cls
    for cls in (
        DaemonNotRunning, DaemonUnavailable, StoreUnavailable, SourceNotAllowed, AccessDenied,
        SourceNotFound, ModelNotFound, InvalidRequest, InvalidArtifact, ResourceExhausted,
        FailedPrecondition, SourceChanged, DataLoss, InternalError,
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


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Status code, details and trailing metadata for an exception leaving an RPC handler."""
    if isinstance(exc, TensorferryError):
        return exc.code, exc.message, ((ERROR_KIND_KEY, type(exc).__name__),)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error in the tensorferry daemon: {type(exc).__name__}: {exc} "
        "(see the daemon's log)",
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
