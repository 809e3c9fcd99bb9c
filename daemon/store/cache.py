"""The local disk tier: chunks of recently loaded models, so a reload after an eviction or
a daemon restart skips the object store.

A chunk is keyed by (source location, object key, ETag, offset, length): a new version of
an object has another ETag and so never hits an old chunk. Each file ends with a CRC-32C
of its bytes, checked on every read; a bad chunk is deleted and fetched again. The
directory is bounded by a byte budget, least recently used chunks going first.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import struct
import threading
from pathlib import Path

import crc32c

from tensorferry.daemon.store.base import ObjectInfo, Store
from tensorferry.daemon.threads import STEP, run_to_end

log = logging.getLogger(__name__)
_TRAILER = struct.Struct("<I")


class DiskTier:
    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = directory
        self.budget = budget
        self._lock = threading.Lock()  # reads and writes run in worker threads
        self._sizes: dict[Path, int] = {}
        self._used: dict[Path, int] = {}  # path -> use sequence number (LRU order)
        self._clock = itertools.count()
        self.hits = self.misses = self.corrupt = 0
        directory.mkdir(parents=True, exist_ok=True)
        found = [(p.stat().st_mtime, p) for p in directory.glob("*/*.chunk")]
        for _, path in sorted(found):  # a hit touches the file: mtime order is LRU order
            self._sizes[path] = path.stat().st_size
            self._used[path] = next(self._clock)
        for partial in directory.glob("*/*.tmp"):  # a write cut short by a crash
            partial.unlink(missing_ok=True)

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def path(self, location: str, obj: ObjectInfo, start: int, length: int) -> Path:
        key = f"{location}\0{obj.key}\0{obj.etag}\0{start}\0{length}".encode()
        digest = hashlib.sha256(key).hexdigest()
        return self.directory / digest[:2] / f"{digest}.chunk"

    def get(self, stop: threading.Event, path: Path, dest: memoryview) -> bool:
        """Fill ``dest`` from the chunk file; False on a miss or a failed check (or once
        ``stop`` is set: the caller was cancelled and wants nothing more)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.misses += 1
            return False
        try:
            done = 0
            # In steps: a cancelled read stops within one, and only then is dest reused.
            while done < len(dest) and not stop.is_set():
                n = os.preadv(fd, [dest[done : done + STEP]], done)
                if n == 0:
                    break
                done += n
            trailer = os.pread(fd, _TRAILER.size, len(dest))
        finally:
            os.close(fd)
        if stop.is_set():
            return False  # not a failed check: nothing to forget
        if (
            done != len(dest)
            or len(trailer) != _TRAILER.size
            or (_TRAILER.unpack(trailer)[0] != crc32c.crc32c(dest))
        ):
            log.warning("disk tier: %s failed its check; fetching it again", path.name)
            self.corrupt += 1
            self.forget(path)
            return False
        self.hits += 1
        with self._lock:
            self._used[path] = next(self._clock)
        with contextlib.suppress(OSError):
            os.utime(path)  # the LRU order survives a restart
        return True

    def put(self, stop: threading.Event, path: Path, data: memoryview) -> None:
        size = len(data) + _TRAILER.size
        if size > self.budget:
            return
        self._make_room(size)
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        # The CRC first, from the same bytes that are written: ``data`` stays put until this
        # returns (run_to_end), and a copy stopped part way is never renamed into place.
        trailer = _TRAILER.pack(crc32c.crc32c(data))
        try:
            with open(tmp, "wb") as f:
                for at in range(0, len(data), STEP):
                    if stop.is_set():
                        break
                    f.write(data[at : at + STEP])
                else:
                    f.write(trailer)
            if stop.is_set():
                return
            os.replace(tmp, path)  # readers never see a half-written chunk
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            self._sizes[path] = size
            self._used[path] = next(self._clock)

    def _make_room(self, size: int) -> None:
        with self._lock:
            oldest = sorted(self._used, key=self._used.__getitem__)
            total = sum(self._sizes.values())
        for path in oldest:
            if total + size <= self.budget:
                break
            total -= self._sizes.get(path, 0)
            self.forget(path)

    def forget(self, path: Path) -> None:
        with self._lock:
            self._sizes.pop(path, None)
            self._used.pop(path, None)
        path.unlink(missing_ok=True)


class CachingStore(Store):
    """A store whose data reads go through the disk tier first."""

    def __init__(self, inner: Store, tier: DiskTier) -> None:
        self.inner = inner
        self.tier = tier
        self.uri = inner.uri

    async def list_objects(self) -> list[ObjectInfo]:
        return await self.inner.list_objects()

    async def read(self, obj: ObjectInfo, start: int, length: int) -> bytes:
        # Headers and index files too: a reload from the tier then needs no GET at all.
        buf = bytearray(length)
        await self.read_into(obj, start, memoryview(buf))
        return bytes(buf)

    async def read_into(self, obj: ObjectInfo, start: int, dest: memoryview) -> None:
        path = self.tier.path(self.uri, obj, start, len(dest))
        # Threads that write dest (or read it) are waited for, also when cancelled.
        if await run_to_end(self.tier.get, path, dest):
            return
        await self.inner.read_into(obj, start, dest)
        try:
            await run_to_end(self.tier.put, path, dest)
        except OSError as exc:  # a full or broken cache disk must not fail the load
            log.warning("disk tier: could not keep %s: %s", path.name, exc)

    def forget(self, obj: ObjectInfo, start: int, length: int) -> None:
        self.tier.forget(self.tier.path(self.uri, obj, start, length))

    def describe(self, obj: ObjectInfo) -> str:
        return self.inner.describe(obj)
