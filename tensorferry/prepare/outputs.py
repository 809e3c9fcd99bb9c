"""Where `tensorferry prepare` writes: a local directory or an S3 prefix.

An object appears whole or not at all: a local file is renamed into place once complete;
an S3 object larger than one part is a multipart upload, completed at the end or aborted.
A killed run leaves partial files or incomplete uploads behind; the next run removes them
before it writes anything.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import io
import os
from pathlib import Path
from typing import Any

from tensorferry.daemon.store.s3 import S3Backend, S3Store
from tensorferry.format.manifest import RESERVED_PREFIX


class ObjectWriter(abc.ABC):
    @abc.abstractmethod
    async def part(self, number: int, data: bytes) -> None:
        """Part ``number`` (from 1); parts are ``part_size`` bytes but the last."""

    @abc.abstractmethod
    async def complete(self) -> None: ...

    @abc.abstractmethod
    async def abort(self) -> None: ...


class Destination(abc.ABC):
    uri: str

    @abc.abstractmethod
    async def names(self) -> list[str]: ...

    @abc.abstractmethod
    async def delete(self, name: str) -> None: ...

    @abc.abstractmethod
    async def clean_partial(self) -> int:
        """Remove what killed runs left half-written; how many."""

    @abc.abstractmethod
    async def open(self, name: str, size: int, part_size: int) -> ObjectWriter: ...

    @abc.abstractmethod
    async def put(self, name: str, data: bytes) -> None: ...


def _partial(name: str) -> str:
    return f".{name}.partial"


class _FileWriter(ObjectWriter):
    def __init__(self, root: Path, name: str, part_size: int) -> None:
        self.tmp, self.final = root / _partial(name), root / name
        self.part_size = part_size
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def _pwrite(self, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    async def part(self, number: int, data: bytes) -> None:
        await asyncio.to_thread(self._pwrite, data, (number - 1) * self.part_size)

    def _complete(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.final)

    async def complete(self) -> None:
        await asyncio.to_thread(self._complete)

    async def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


class LocalDestination(Destination):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root).rstrip("/") + "/"

    async def names(self) -> list[str]:
        return sorted(e.name for e in os.scandir(self.root) if e.is_file())

    async def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    async def clean_partial(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        stale = list(self.root.glob(_partial(RESERVED_PREFIX + "*")))
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    async def open(self, name: str, size: int, part_size: int) -> ObjectWriter:
        return _FileWriter(self.root, name, part_size)

    async def put(self, name: str, data: bytes) -> None:
        writer = _FileWriter(self.root, name, max(len(data), 1))
        try:
            await writer.part(1, data)
            await writer.complete()
        except BaseException:
            await writer.abort()
            raise


class S3Destination(Destination):
    def __init__(self, backend: S3Backend, bucket: str, prefix: str) -> None:
        self.backend, self.bucket, self.prefix = backend, bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}"

    async def call(self, what: str, method: str, **kwargs: Any) -> Any:
        try:
            return await getattr(self.backend.client, method)(Bucket=self.bucket, **kwargs)
        except Exception as exc:
            raise self.backend.translate(f"{self.uri}{what}", self.bucket, exc) from exc

    async def names(self) -> list[str]:
        listing = await S3Store(self.backend, self.bucket, self.prefix, None).list_objects()
        return sorted(o.key for o in listing)

    async def delete(self, name: str) -> None:
        await self.call(name, "delete_object", Key=self.prefix + name)

    async def clean_partial(self) -> int:
        uploads: list[tuple[str, str]] = []
        marker: dict[str, str] = {}
        while True:
            page = await self.call(
                "", "list_multipart_uploads", Prefix=self.prefix + RESERVED_PREFIX, **marker
            )
            uploads += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", ())]
            if not page.get("IsTruncated"):
                break
            marker = {"KeyMarker": page["NextKeyMarker"],
                      "UploadIdMarker": page["NextUploadIdMarker"]}  # fmt: skip
        for key, upload in uploads:
            await self.call(key[len(self.prefix) :], "abort_multipart_upload", Key=key,
                            UploadId=upload)  # fmt: skip
        return len(uploads)

    async def open(self, name: str, size: int, part_size: int) -> ObjectWriter:
        if size <= part_size:
            return _SingleWriter(self, name)
        created = await self.call(name, "create_multipart_upload", Key=self.prefix + name)
        return _MultipartWriter(self, name, created["UploadId"])

    async def put(self, name: str, data: bytes) -> None:
        # A file object (BytesIO shares a bytes object's buffer): aiohttp warns that raw
        # bytes could block the loop.
        await self.call(name, "put_object", Key=self.prefix + name, Body=io.BytesIO(data))


class _SingleWriter(ObjectWriter):
    """An object of at most one part: one PUT, nothing to abort."""

    def __init__(self, dest: S3Destination, name: str) -> None:
        self.dest, self.name, self.sent = dest, name, False

    async def part(self, number: int, data: bytes) -> None:
        await self.dest.put(self.name, data)
        self.sent = True

    async def complete(self) -> None:
        if not self.sent:  # an empty object has no parts
            await self.dest.put(self.name, b"")

    async def abort(self) -> None:
        pass


class _MultipartWriter(ObjectWriter):
    def __init__(self, dest: S3Destination, name: str, upload: str) -> None:
        self.dest, self.name, self.upload = dest, name, upload
        self.key = dest.prefix + name
        self.etags: dict[int, str] = {}
        self.open = True

    async def part(self, number: int, data: bytes) -> None:
        done = await self.dest.call(
            self.name, "upload_part", Key=self.key, UploadId=self.upload, PartNumber=number,
            Body=io.BytesIO(data),
        )  # fmt: skip
        self.etags[number] = done["ETag"]

    async def complete(self) -> None:
        parts = [{"PartNumber": n, "ETag": e} for n, e in sorted(self.etags.items())]
        await self.dest.call(
            self.name, "complete_multipart_upload", Key=self.key, UploadId=self.upload,
            MultipartUpload={"Parts": parts},
        )  # fmt: skip
        self.open = False

    async def abort(self) -> None:
        if self.open:
            self.open = False
            with contextlib.suppress(Exception):
                await self.dest.call(self.name, "abort_multipart_upload", Key=self.key,
                                     UploadId=self.upload)  # fmt: skip
