"""Local directory source: files read with pread into their destination.

Only regular files directly in the directory are served, each opened relative to a
descriptor of the directory with no symlink followed: a symlink, even one pointing inside,
could be swapped for one pointing anywhere between the listing and the read. A read checks
that the file it opened is the one listed (device, inode, size and mtime).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import threading
from pathlib import Path

from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.daemon.store.beneath import open_beneath, open_directory
from tensorferry.daemon.threads import STEP, run_to_end
from tensorferry.errors import (
    AccessDenied,
    InvalidRequest,
    SourceChanged,
    SourceNotFound,
    quote,
)

log = logging.getLogger(__name__)

#: O_NONBLOCK: a name swapped for a FIFO after the listing must not block its open.
_FILE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY


def _etag(st: os.stat_result) -> str:
    return f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}-{st.st_dev:x}"


class LocalStore(Store):
    def __init__(self, directory: Path, uri: str, single: str | None = None) -> None:
        #: Resolved (parse_uri does): it is opened again with no symlink followed.
        self.root = directory
        self.uri = uri
        #: One file of the directory (a URI naming one .safetensors file): the only object.
        self.single = single

    async def list_objects(self) -> list[ObjectInfo]:
        return await asyncio.to_thread(self._scan)

    def _open_root(self) -> int:
        try:
            return open_directory(self.root)
        except (FileNotFoundError, NotADirectoryError):
            raise SourceNotFound(f"{self.uri}: no such directory on the daemon's host") from None
        except PermissionError:
            raise AccessDenied(
                f"{self.uri}: the daemon's user may not read this directory"
            ) from None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            # parse_uri resolved the path before the allowlist saw it: a symlink now is new.
            raise SourceChanged(
                f"{self.uri}: a directory on its path was replaced by a symbolic link while "
                "it was being loaded; the daemon follows no symlink there, load it again"
            ) from None

    def _scan(self) -> list[ObjectInfo]:
        root = self._open_root()
        try:
            objects, links = [], []
            for name in sorted(os.listdir(root)):
                if self.single not in (None, name):
                    continue
                try:
                    st = os.stat(name, dir_fd=root, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # gone since the directory was read: a downloader's temp file
                if stat.S_ISREG(st.st_mode):
                    objects.append(ObjectInfo(name, st.st_size, _etag(st)))
                elif stat.S_ISLNK(st.st_mode):
                    links.append(name)
        except PermissionError:
            raise AccessDenied(
                f"{self.uri}: the daemon's user may not read this directory"
            ) from None
        finally:
            os.close(root)
        if links:
            log.warning(
                "%s: not serving %s: symbolic links are not followed (one could be swapped "
                "to point outside the directory); copy or hard-link the files instead",
                self.uri, quote(links),
            )  # fmt: skip
        return objects

    def _name(self, obj: ObjectInfo) -> str:
        if "/" in obj.key or "\0" in obj.key or obj.key in ("", ".", ".."):
            raise InvalidRequest(f"{obj.key!r} is not a file name inside {self.uri}")
        return obj.key

    def _open(self, obj: ObjectInfo) -> int:
        name = self._name(obj)
        root = self._open_root()
        try:
            fd = open_beneath(root, name, _FILE_FLAGS)
        except FileNotFoundError:
            raise SourceNotFound(f"{self.describe(obj)}: no such file") from None
        except PermissionError:
            raise AccessDenied(
                f"{self.describe(obj)}: the daemon's user may not read this file"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AccessDenied(
                    f"{self.describe(obj)} is a symbolic link; the daemon serves only regular "
                    f"files in {self.uri}"
                ) from None
            if exc.errno == errno.ENXIO:  # a socket now: not the file that was listed
                raise self._changed(obj) from None
            raise
        finally:
            os.close(root)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or _etag(st) != obj.etag:
            os.close(fd)
            raise self._changed(obj)
        return fd

    def _changed(self, obj: ObjectInfo) -> SourceChanged:
        return SourceChanged(
            f"{self.describe(obj)} was replaced while it was being loaded; load it again to "
            "get the new version"
        )

    def _pread_into(
        self, stop: threading.Event, obj: ObjectInfo, start: int, dest: memoryview
    ) -> None:  # fmt: skip
        fd = self._open(obj)
        try:
            done = 0
            # In steps: a cancelled read stops within one, and only then is dest reused.
            while done < len(dest) and not stop.is_set():
                n = os.preadv(fd, [dest[done : done + STEP]], start + done)
                if n == 0:
                    raise SourceNotFound(
                        f"{self.describe(obj)} is shorter than expected: ended at byte "
                        f"{start + done}"
                    )
                done += n
        finally:
            os.close(fd)

    async def read(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        buf = bytearray(length)
        await run_to_end(self._pread_into, obj, start, memoryview(buf))
        return bytes(buf)

    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        await run_to_end(self._pread_into, obj, start, dest)
