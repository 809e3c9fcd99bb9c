"""The messages between the daemon and its fetch workers (``workers``, ``worker_main``).

A message is a tuple of plain values (str, int, float, bytes, dicts and tuples of them),
``marshal``led behind a 4-byte length: both ends are this same code, and marshal costs a
few microseconds where pickle would invite objects across. Exceptions do not travel as
objects: custom classes (HttpError with its status and body, RangeMismatch, ProxyFailed,
our TensorferryErrors) would not survive pickling intact, so each is encoded as its kind
and its data and rebuilt as the same type on the daemon's side.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import marshal
import socket
import struct
from typing import Any

from tensorferry import errors
from tensorferry.daemon.store._http import HttpError, OtherVersionAnswer
from tensorferry.daemon.store._http_head import RangeMismatch
from tensorferry.daemon.store.proxy import ProxyFailed

log = logging.getLogger(__name__)
_LEN = struct.Struct("<I")
#: No message comes near this: a GET's URL and headers, an error's body (< 64 KiB).
MAX_MESSAGE = 4 << 20
_BUILTIN = (
    ConnectionResetError, ConnectionAbortedError, ConnectionRefusedError, BrokenPipeError,
    ConnectionError, TimeoutError,
)  # fmt: skip
_BUILTIN_NAMES = {cls.__name__: cls for cls in _BUILTIN}

Message = tuple[Any, ...]
#: How a GET failed, as data; None when it did not.
Failure = tuple[Any, ...] | None


def pack(message: Message) -> bytes:
    body = marshal.dumps(message)
    return _LEN.pack(len(body)) + body


async def receive(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None at the end of the stream: the other side is gone, or its
    socket failed (a write to a dead peer fails the reader too, with EPIPE or ECONNRESET).

    A message that does not decode is skipped (logged once): both ends are this same code,
    so it is a bug, and the framing around it still holds.
    """
    while True:
        try:
            head = await reader.readexactly(_LEN.size)
            (length,) = _LEN.unpack(head)
            if length > MAX_MESSAGE:  # the framing is lost: nothing after it can be read
                log.error("a fetch worker message of %d bytes: closing the link", length)
                return None
            body = await reader.readexactly(length)
        except (asyncio.IncompleteReadError, OSError):
            return None
        try:
            message = marshal.loads(body)
        except (EOFError, ValueError, TypeError) as exc:
            odd(f"a fetch worker message that does not decode ({exc})")
            continue
        if isinstance(message, tuple) and message:
            return message
        odd(f"a malformed fetch worker message: {type(message).__name__}")


_odd_seen = False


def odd(what: str) -> None:
    """A message this end does not understand: logged once per process, then ignored."""
    global _odd_seen
    if not _odd_seen:
        _odd_seen = True
        log.error("%s; ignored (and any more like it)", what)


def encode(exc: BaseException) -> Failure:
    """``exc`` as data that ``decode`` turns back into the same type with the same data."""
    if isinstance(exc, OtherVersionAnswer):
        return ("other-version", str(exc).removeprefix("HTTP 206 with "))
    if isinstance(exc, HttpError):
        return ("http", exc.status, dict(exc.headers), bytes(exc.body))
    if isinstance(exc, errors.TensorferryError):
        return ("ours", type(exc).__name__, exc.message)
    if isinstance(exc, ProxyFailed):
        return ("proxy", str(exc))
    if isinstance(exc, RangeMismatch):
        return ("range", str(exc))
    if isinstance(exc, socket.gaierror):  # its EAI code is no errno: keep the type itself
        return ("gai", exc.errno or 0, exc.strerror or str(exc))
    if type(exc) in _BUILTIN:
        return ("builtin", type(exc).__name__, str(exc))
    if isinstance(exc, OSError):
        return ("os", exc.errno or 0, exc.strerror or str(exc))
    # Not an outcome of a GET the daemon knows how to judge: a bug in the worker, shown as one.
    return ("bug", f"{type(exc).__name__}: {exc}")


def decode(failure: tuple[Any, ...]) -> BaseException:
    kind = failure[0]
    if kind == "other-version":
        return OtherVersionAnswer(failure[1])
    if kind == "http":
        return HttpError(failure[1], failure[2], failure[3])
    if kind == "ours":
        cls = getattr(errors, failure[1], None)
        if isinstance(cls, type) and issubclass(cls, errors.TensorferryError):
            return cls(failure[2])
        return errors.InternalError(f"{failure[1]}: {failure[2]}")
    if kind == "proxy":
        return ProxyFailed(failure[1])
    if kind == "range":
        return RangeMismatch(failure[1])
    if kind == "builtin":
        cls = _BUILTIN_NAMES.get(failure[1])
        return (cls or ConnectionError)(failure[2])
    if kind == "gai":
        return socket.gaierror(failure[1], failure[2])
    if kind == "os":
        code = failure[1]
        if code in errno.errorcode:
            return OSError(code, failure[2])
        return OSError(failure[2])
    if kind == "cancelled":  # a worker stopping: the GET is no one's any more
        return ConnectionError("the fetch worker stopped before the GET completed")
    if kind == "gone":
        # The worker died with the GET in flight: nothing of it can land any more, and
        # another worker may try again (a ConnectionError is a retryable transport failure).
        return ConnectionError(failure[1])
    detail = failure[1] if kind == "bug" and len(failure) > 1 else repr(failure)
    return errors.InternalError(
        f"a fetch worker failed a GET with an error it should not raise ({detail}); this is "
        "a tensorferry bug: report it with the daemon's log"
    )


def gone(message: str) -> Failure:
    return ("gone", message)


__all__ = ["MAX_MESSAGE", "Failure", "Message", "decode", "encode", "gone", "odd", "pack"]
