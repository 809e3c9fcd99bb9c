"""Local directory source: files read with pread into their destination."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.errors import AccessDenied, InvalidRequest, SourceNotFound


def _etag(st: os.stat_result) -> str:
    return f"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"


class LocalStore(Store):
    def __init__(self, directory: Path, uri: str, single: str | None = None) -> None:
        self.root = directory
        self.uri = uri
        #: One file of the directory (a URI naming one .safetensors file): the only object.
        self.single = single

    async def list_objects(self) -> list[ObjectInfo]:
        return await asyncio.to_thread(self._scan)

    def _scan(self) -> list[ObjectInfo]:
        if not self.root.is_dir():
            raise SourceNotFound(f"{self.uri}: no such directory on the daemon's host")
        objects = []
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if not entry.is_file() or self.single not in (None, entry.name):
                continue
            real = Path(entry.path).resolve()
            # A symlink may point anywhere; only files really inside the root are served.
            if not real.is_relative_to(self.root):
                continue
            objects.append(ObjectInfo(entry.name, entry.stat().st_size, _etag(entry.stat())))
        return objects

    def _path(self, obj: ObjectInfo) -> Path:
        if "/" in obj.key or obj.key in ("", ".", ".."):
            raise InvalidRequest(f"{obj.key!r} is not a file name inside {self.uri}")
        return self.root / obj.key

    def _open(self, obj: ObjectInfo) -> int:
        real = self._path(obj).resolve()
        if not real.is_relative_to(self.root):
            raise AccessDenied(f"{self.describe(obj)} points outside {self.uri}")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceNotFound(f"{self.describe(obj)}: no such file") from None
        except PermissionError:
            raise AccessDenied(
                f"{self.describe(obj)}: the daemon's user may not read this file"
            ) from None
        if _etag(os.fstat(fd)) != obj.etag:
            os.close(fd)
            raise SourceNotFound(f"{self.describe(obj)} changed while it was being loaded")
        return fd

    def _pread_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        fd = self._open(obj)
        try:
            done = 0
            while done < len(dest):
                n = os.preadv(fd, [dest[done:]], start + done)
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
        await asyncio.to_thread(self._pread_into, obj, start, memoryview(buf))
        return bytes(buf)

    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        await asyncio.to_thread(self._pread_into, obj, start, dest)
