"""Opening a path under a directory descriptor without following a symlink anywhere.

A check of where a path resolves to, followed by an ``open`` of that path, races with a
user who swaps a name for a symlink in between: the open then reaches any file the
daemon can read. Here every component is opened relative to the one before it and a
symlink at any of them fails the open with ELOOP, so what is opened is what was asked.
``openat2`` (Linux 5.6) does this in one call; without it (an older kernel, a seccomp
profile that refuses it) each component is opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct
from collections.abc import Callable
from pathlib import Path

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RESOLVE = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
_OPENAT2 = {"x86_64": 437, "aarch64": 437}.get(platform.machine())
_HOW = struct.Struct("=QQQ")  # struct open_how: flags, mode, resolve

_syscall: Callable[..., int] | None = None
_probed = False


def _openat2(dirfd: int, path: str, flags: int, call: Callable[..., int] | None = None) -> int:
    call = call or _syscall
    assert call is not None
    how = _HOW.pack(flags, 0, _RESOLVE)
    fd = int(call(_OPENAT2, dirfd, os.fsencode(path), how, len(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path)
    return fd


def _have_openat2() -> bool:
    """Whether openat2 works here: looked at once, with a call that cannot fail otherwise."""
    global _syscall, _probed
    if not _probed:
        if _OPENAT2 is not None:
            try:
                func = ctypes.CDLL(None, use_errno=True).syscall
                func.restype = ctypes.c_long
                func.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_char_p, ctypes.c_size_t]  # fmt: skip
                root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.close(_openat2(root, ".", os.O_PATH | os.O_CLOEXEC, func))
                finally:
                    os.close(root)
                _syscall = func  # only once it has worked: another thread may use it at once
            except (OSError, AttributeError):  # ENOSYS, or EPERM from a seccomp filter
                pass
        _probed = True
    return _syscall is not None


def _parts(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise OSError(errno.EXDEV, "a path to open beneath a directory may not hold . or ..")
    return parts or ["."]


def open_beneath(dirfd: int, path: str, flags: int) -> int:
    """Open ``path``, relative to the directory ``dirfd``, as ``os.open`` does with
    ``flags`` (close-on-exec always), but fail with ELOOP where any component of it is a
    symlink, and never leave the directory (no ``..``)."""
    parts = _parts(path)
    flags |= os.O_CLOEXEC
    if _have_openat2():
        # Not O_NOFOLLOW: with it a final symlink fails O_DIRECTORY as ENOTDIR, not ELOOP.
        return _openat2(dirfd, "/".join(parts), flags)
    current = dirfd
    try:
        for part in parts[:-1]:
            # O_PATH: searching a directory needs only execute permission, as a path does.
            step = _open_nofollow(part, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, current)
            if current != dirfd:
                os.close(current)
            current = step
        return _open_nofollow(parts[-1], flags, current)
    finally:
        if current != dirfd:
            os.close(current)


def _open_nofollow(name: str, flags: int, dirfd: int) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW, dir_fd=dirfd)
    except NotADirectoryError:
        # O_NOFOLLOW opens a symlink itself (O_PATH) or looks at it: no directory either way.
        if stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


def open_directory(path: Path) -> int:
    """A descriptor of the absolute directory ``path``, opened from ``/`` with no symlink
    followed: a path resolved and checked earlier opens as the same directory or fails."""
    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_beneath(root, str(path), os.O_RDONLY | os.O_DIRECTORY)
    finally:
        os.close(root)
