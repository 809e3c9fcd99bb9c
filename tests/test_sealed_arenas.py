"""Issue #28: sealed manifests beside ready CPU arenas (``sinks/sealed.py``): written whole,
read back only when every check holds. Their adoption by the sink: test_adopt_shm.py."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tensorferry.daemon.planner import PlannedTensor
from tensorferry.daemon.sinks import sealed
from tensorferry.daemon.sinks.sealed import (
    NotAdoptable,
    SealedArena,
    manifest_path,
    read_sealed,
    seal,
)

MIB = 1 << 20
SOCKET = "/run/tensorferry/tf.sock"
PATTERN = bytes(range(256)) * 16
ADOPT_LOG = "tensorferry.daemon.sinks.adopt_shm"


def _manifest(**changes: Any) -> SealedArena:
    m = SealedArena(
        socket=SOCKET, uri="s3://bucket/model/", weights="s3://bucket/model/", version="v1",
        device="cpu", select=(), rank=0, world_size=0,
        objects=(("model/model.safetensors", '"etag-1"', 4096 + MIB),),
        tensors=(PlannedTensor("w", "F32", (2, 4), 0, 32),
                 PlannedTensor("b", "BF16", (8,), 64, 16)),
        names=(), size=MIB, sealed_at=1700000000.5,
    )  # fmt: skip
    return dataclasses.replace(m, **changes)


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / f"tensorferry.{'a' * 12}.{'b' * 32}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    os.ftruncate(fd, MIB)
    yield path, fd
    os.close(fd)


@pytest.fixture
def no_group_bits() -> Iterator[None]:
    # A umask that would leave the manifest 0400 if its mode came from the umask.
    old = os.umask(0o277)
    yield
    os.umask(old)


def test_a_sealed_manifest_reads_back_as_written(
    segment: tuple[Path, int], no_group_bits: None
) -> None:
    path, fd = segment
    m = _manifest(select=("w",), names=("w", "b", "c"), rank=1, world_size=2)
    written = seal(path, fd, m)
    assert written == manifest_path(path) == path.with_name(path.name + ".sealed")
    assert oct(written.stat().st_mode & 0o777) == "0o600"
    assert read_sealed(path, fd, socket=SOCKET) == m
    assert (m.key.select, m.key.rank, m.key.world_size) == (("w",), 1, 2)
    assert sorted(p.name for p in path.parent.glob("tensorferry.*")) == [path.name, written.name]
    with pytest.raises(FileExistsError):  # link(2): never onto a file already there
        seal(path, fd, m)
    assert read_sealed(path, fd, socket=SOCKET) == m
    # Pinned later: our own manifest rewritten whole (rename(2) over it), still 0600, alone.
    pinned = dataclasses.replace(m, pinned=True)
    assert seal(path, fd, pinned, replace=True) == written
    assert read_sealed(path, fd, socket=SOCKET) == pinned
    assert oct(written.stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in path.parent.glob("tensorferry.*")) == [path.name, written.name]


def _tamper(path: Path) -> None:
    raw = bytearray(manifest_path(path).read_bytes())
    raw[-40] ^= 1  # in the body, before the digest
    manifest_path(path).write_bytes(bytes(raw))


def _symlink(path: Path) -> None:
    real = path.with_name("elsewhere")
    manifest_path(path).rename(real)
    manifest_path(path).symlink_to(real)


def _other_inode(path: Path) -> None:
    # A copy of the segment has other inode numbers: the manifest does not describe it.
    copy = path.with_name("copy")
    shutil.copyfile(path, copy)
    os.rename(copy, path)


Change = Callable[[Path], object] | None
REFUSALS: dict[str, tuple[Change, dict[str, object], str]] = {
    "tampered": (_tamper, {}, "its manifest's digest does not match its body"),
    "mode": (lambda p: manifest_path(p).chmod(0o644), {}, "its manifest has mode 0644, not 0600"),
    "socket": (
        None, {"socket": "/tmp/other.sock"}, "sealed by the daemon of socket /tmp/other.sock"
    ),
    "outside": (
        None,
        {"tensors": (PlannedTensor("w", "F32", (4,), MIB - 8, 16),)},
        "its manifest's tensor 'w' lies outside the segment ([1048568, 1048584) of 1048576 bytes)",
    ),
    "nbytes": (
        None,
        {"tensors": (PlannedTensor("w", "F32", (4,), 0, 8),)},
        "its manifest's tensor 'w' has 8 bytes, not the 16 of its shape and dtype",
    ),
    "dtype": (
        None,
        {"tensors": (PlannedTensor("w", "Q4", (4,), 0, 8),)},
        "its manifest's tensor 'w' has unknown dtype 'Q4'",
    ),
    "twice": (
        None,
        {"tensors": (PlannedTensor("w", "U8", (4,), 0, 4), PlannedTensor("w", "U8", (4,), 8, 4))},
        "its manifest names tensor 'w' twice",
    ),
    "size": (
        lambda p: os.truncate(p, 2 * MIB), {},
        "the segment has 2097152 bytes, its manifest says 1048576",
    ),
    "inode": (_other_inode, {}, "its manifest describes another file"),
    "symlink": (_symlink, {}, "its manifest is a symlink"),
    "missing": (lambda p: manifest_path(p).unlink(), {}, "it has no sealed manifest"),
    # A second name of the segment could outlive a recycle of it under the first.
    "linked": (lambda p: os.link(p, p.with_name("other")), {}, "the segment has 2 names, not 1"),
    "manifest linked": (
        lambda p: os.link(manifest_path(p), p.with_name("other")), {},
        "its manifest has 2 names, not 1",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_manifest_that_cannot_be_trusted_is_refused_with_its_reason(
    segment: tuple[Path, int], case: str
) -> None:
    path, fd = segment
    change, ours, reason = REFUSALS[case]
    seal(path, fd, _manifest(**ours))
    if change is not None:
        change(path)
    check_fd = os.open(path, os.O_RDWR) if case == "inode" else fd
    try:
        with pytest.raises(NotAdoptable) as err:
            read_sealed(path, check_fd, socket=SOCKET)
    finally:
        if check_fd != fd:
            os.close(check_fd)
    assert str(err.value) == reason


def test_an_oversized_manifest_is_refused_unread(
    segment: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = segment
    seal(path, fd, _manifest())
    monkeypatch.setattr(sealed, "MAX_MANIFEST_BYTES", 100)
    size = manifest_path(path).stat().st_size
    with pytest.raises(NotAdoptable) as err:
        read_sealed(path, fd, socket=SOCKET)
    assert str(err.value) == f"its manifest has {size} bytes, over 100"
