"""One output object as its bytes pass: alignment padding, per-chunk crc32c, upload parts.

Runs in a worker thread, one piece at a time; the event loop takes the finished parts
between pieces, so nothing here is shared with it while it runs.
"""

from __future__ import annotations

import collections

import crc32c

from tensorferry.prepare.layout import OutSlice

MIN_PART = 8 << 20
MAX_PARTS = 10_000  # S3's limit on parts in one multipart upload
_ZEROS = memoryview(bytes(1 << 20))


def part_size_for(size: int) -> int:
    """Parts of at least 8 MiB, and few enough for S3 (MiB multiples)."""
    need = -(-size // (MAX_PARTS - 1))
    return max(MIN_PART, -(-need // (1 << 20)) * (1 << 20))


class ObjectBuilder:
    def __init__(self, size: int, slices: list[OutSlice], chunk_size: int) -> None:
        self.size = size
        self.part_size = part_size_for(size)
        self.chunk_size = chunk_size
        self._queue = collections.deque(slices)
        self._slice: OutSlice | None = None
        self._done = 0  # bytes of the current slice written
        self._crc = 0
        self._pos = 0  # bytes of the object emitted
        self._number = 1
        # One buffer, reused: each full part leaves as bytes, which an upload can wrap
        # without another copy.
        self._buf = bytearray(min(self.part_size, size))
        self._fill = 0
        self.ready: list[tuple[int, bytes]] = []  # (part number, bytes) to upload
        self._held: dict[int, bytearray] = {}  # id(slice) -> its bytes, until its turn

    def _emit(self, data: memoryview) -> None:
        while data:
            part = min(self.part_size, self.size - (self._number - 1) * self.part_size)
            if part <= 0:
                raise AssertionError("an output object got more bytes than its layout")
            n = min(len(data), part - self._fill)
            self._buf[self._fill : self._fill + n] = data[:n]
            self._fill += n
            self._pos += n
            data = data[n:]
            if self._fill == part:
                self.ready.append((self._number, bytes(memoryview(self._buf)[:part])))
                self._number += 1
                self._fill = 0

    def _pad_to(self, offset: int) -> None:
        while self._pos < offset:
            self._emit(_ZEROS[: min(len(_ZEROS), offset - self._pos)])

    def _next_slice(self) -> OutSlice:
        while self._queue:
            s = self._queue.popleft()
            if s.nbytes:
                self._pad_to(s.offset)
                self._slice, self._done, self._crc = s, 0, 0
                return s
        raise AssertionError("an output object got bytes past its last slice")

    def write(self, data: memoryview, slice: OutSlice | None = None) -> None:
        """The next bytes of ``slice`` (None: of the slice in offset order)."""
        if slice is not None and not self._is_next(slice):
            # A small tensor held back (see layout.make_layout): its place comes later.
            self._held.setdefault(id(slice), bytearray()).extend(data)
            return
        self._write_in_order(data)
        while self._slice is None:
            following = next((q for q in self._queue if q.nbytes), None)
            if following is None or id(following) not in self._held:
                return
            self._write_in_order(memoryview(self._held.pop(id(following))))

    def _is_next(self, s: OutSlice) -> bool:
        if self._slice is not None:
            return self._slice is s
        return next((q for q in self._queue if q.nbytes), None) is s

    def _write_in_order(self, data: memoryview) -> None:
        while data:
            s = self._slice or self._next_slice()
            take = min(
                len(data), s.nbytes - self._done, self.chunk_size - self._done % self.chunk_size
            )
            piece = data[:take]
            self._crc = crc32c.crc32c(piece, self._crc)
            self._emit(piece)
            self._done += take
            data = data[take:]
            if self._done % self.chunk_size == 0 or self._done == s.nbytes:
                s.crc.append(self._crc)
                self._crc = 0
            if self._done == s.nbytes:
                self._slice = None

    def finish(self) -> None:
        """Check every slice got its bytes; pad to the object's size; flush the last part."""
        if self._slice is not None or self._held or any(s.nbytes for s in self._queue):
            raise AssertionError("an output object ended before all its slices were written")
        self._queue.clear()
        self._pad_to(self.size)  # the last part is sized to end exactly here

    def take_ready(self) -> list[tuple[int, bytes]]:
        ready, self.ready = self.ready, []
        return ready
