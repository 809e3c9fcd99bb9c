"""Issue #28: the adoption of sealed arenas by the next daemon of the same socket, on the
sink's side (``sinks/adopt_shm.py``, ``cpu_shm.py``, ``shm_names.py``): what is claimed,
what is swept, what stays. The manifests themselves: test_sealed_arenas.py."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tensorferry.daemon.sinks import adopt_shm, sealed
from tensorferry.daemon.sinks.cpu_shm import CpuShmSink
from tensorferry.daemon.sinks.sealed import SealedArena, manifest_path, read_sealed
from tests.test_sealed_arenas import ADOPT_LOG, MIB, PATTERN, SOCKET, _manifest


class FakeFdStore:
    """systemd's descriptor store, as the sink sees it: what it was handed, and what it gave."""

    def __init__(self, given: dict[str, int] | None = None) -> None:
        self.given = dict(given or {})
        self.stored: dict[str, tuple[int, int]] = {}  # name -> (st_dev, st_ino)
        self.removed: list[str] = []

    def store(self, name: str, fd: int) -> bool:
        st = os.fstat(fd)
        self.stored[name] = (st.st_dev, st.st_ino)
        return True

    def remove(self, name: str) -> bool:
        self.removed.append(name)
        self.stored.pop(name, None)
        return True

    def take(self) -> dict[str, int]:
        given, self.given = self.given, {}
        return given


def _files(shm: Path, instance: str) -> list[str]:
    return sorted(
        p.name[len(f"tensorferry.{instance}.") :] for p in shm.glob(f"tensorferry.{instance}.*")
    )


def _kind(name: str) -> str:
    return "segment" if len(name) == 32 else name.split("-")[0].split(".")[-1]


async def _dead_daemon(shm: Path, *, crash: bool, socket: str = SOCKET) -> tuple[str, int, str]:
    """A daemon that sealed one arena and died (or exited leaving it): its instance, the
    sealed segment's inode and name. Crashed, it also leaves a half-written arena and a
    freed one."""
    sink = CpuShmSink(shm, socket=socket, adopt=True, recycle_budget=4 * MIB)
    await sink.__aenter__()
    ready = sink.allocate(MIB, "m1")
    ready.view[: len(PATTERN)] = PATTERN
    sink.seal(ready, _manifest(socket=socket))
    assert ready.sealed
    inode = ready.path.stat().st_ino
    half = sink.allocate(MIB, "m2")  # never sealed: its load had not finished
    half.view[:4] = b"half"
    freed = sink.allocate(MIB, "m3")
    sink.release(freed)  # kept for reuse as free-<token>
    if crash:
        kinds = sorted(_kind(n) for n in _files(shm, sink.instance))
        assert kinds == ["free", "lock", "sealed", "segment", "segment"]
        # SIGKILL: nothing runs; the files stay and the lock's flock is free.
        assert sink.names._lock_fd is not None
        os.close(sink.names._lock_fd)
        for arena in (ready, half):
            assert arena.reservation is not None
            arena.reservation.close()
            mapping = arena.detach()
            assert mapping is not None
            mapping.close()
        sink._drop_recycled()
    else:
        sink.leave(ready)
        await sink.__aexit__(None, None, None)  # releases the others, unlocks
        assert _files(shm, sink.instance) == [
            ready.name.split(".")[-1] + s for s in ("", ".sealed")
        ]
    return sink.instance, inode, ready.name


@pytest.mark.parametrize("crash", [True, False], ids=["sigkill", "sigterm"])
async def test_a_new_daemon_adopts_only_the_sealed_arena_of_a_dead_one(
    tmp_path: Path, crash: bool
) -> None:
    dead, inode, _ = await _dead_daemon(tmp_path, crash=crash)
    async with CpuShmSink(tmp_path, socket=SOCKET, adopt=True, recycle_budget=4 * MIB) as sink:
        assert _files(tmp_path, dead) == []  # half-written, freed, lock: removed
        (claimed,) = sink.claimed
        assert claimed.path.name.startswith(f"tensorferry.{sink.instance}.")
        assert claimed.path.stat().st_ino == os.fstat(claimed.fd).st_ino == inode
        assert read_sealed(claimed.path, claimed.fd, socket=SOCKET) == claimed.manifest
        assert claimed.manifest == _manifest()
        assert sorted(_files(tmp_path, sink.instance)) == sorted(
            [claimed.path.name.split(".")[-1] + s for s in ("", ".sealed")] + ["lock"]
        )
        arena = sink.adopt(claimed)
        assert (arena.sealed, sink.adopted, sink.used, sink.arena_names) == (
            True, 1, MIB, [claimed.path.name],
        )  # fmt: skip
        assert bytes(arena.view[: len(PATTERN)]) == PATTERN
        assert bytes(arena.view[len(PATTERN) : len(PATTERN) + 4]) == bytes(4)
        assert oct(arena.path.stat().st_mode & 0o777) == "0o640"
        # A worker of the dead daemon may map it still: never recycled, even when asked.
        sink.release(arena)
        assert (sink.used, sink.recycled_bytes) == (0, 0)
        assert _files(tmp_path, sink.instance) == ["lock"]
    assert list(tmp_path.glob("tensorferry.*")) == []


async def test_without_adopt_the_sweep_removes_every_file_of_a_dead_daemon(tmp_path: Path) -> None:
    dead, _, _ = await _dead_daemon(tmp_path, crash=True)
    async with CpuShmSink(tmp_path, socket=SOCKET, adopt=False) as sink:
        assert sink.claimed == []
        assert _files(tmp_path, dead) == []
        assert _files(tmp_path, sink.instance) == ["lock"]


async def test_the_sealed_arena_of_another_socket_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead, _, segment = await _dead_daemon(tmp_path, crash=False, socket="/tmp/other.sock")
    caplog.set_level(logging.INFO, ADOPT_LOG)
    async with CpuShmSink(tmp_path, socket=SOCKET, adopt=True) as sink:
        assert sink.claimed == []
        assert _files(tmp_path, dead) == []
    assert [r.getMessage() for r in caplog.records if r.name == ADOPT_LOG] == [
        f"not adopting {segment}: sealed by the daemon of socket /tmp/other.sock"
    ]


async def test_a_claimed_arena_neither_adopted_nor_discarded_stays_for_the_next_daemon(
    tmp_path: Path,
) -> None:
    await _dead_daemon(tmp_path, crash=True)
    async with CpuShmSink(tmp_path, socket=SOCKET, adopt=True) as second:
        (claimed,) = second.claimed  # the daemon stops before checking its source
        inode = os.fstat(claimed.fd).st_ino
    assert claimed.fd == -1
    assert claimed.path.stat().st_ino == inode
    assert manifest_path(claimed.path).exists()
    async with CpuShmSink(tmp_path, socket=SOCKET, adopt=True) as third:
        (again,) = third.claimed
        assert os.fstat(again.fd).st_ino == inode
        assert not claimed.path.exists()
        third.discard(again, "its source changed while the daemon was down")
        assert _files(tmp_path, third.instance) == ["lock"]
        assert again.fd == -1


async def test_release_removes_the_manifest_before_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FakeFdStore()
    async with CpuShmSink(tmp_path, socket=SOCKET, adopt=True, fd_store=store,
                          recycle_budget=4 * MIB) as sink:  # fmt: skip
        arenas = [sink.allocate(MIB, f"m{i}") for i in range(2)]
        for arena in arenas:
            sink.seal(arena, _manifest())
            assert store.stored[arena.name] == (
                os.stat(arena.path).st_dev,
                os.stat(arena.path).st_ino,
            )
        gone: list[str] = []
        real_unlink, real_link = os.unlink, os.link

        def unlink(path: str | Path, *args: object, **kw: object) -> None:
            gone.append(Path(path).name)
            real_unlink(path, *args, **kw)  # type: ignore[arg-type]

        def link(src: str | Path, dst: str | Path, *args: object, **kw: object) -> None:
            gone.append(f"link {Path(src).name}")
            real_link(src, dst, *args, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(os, "link", link)
        sink.release(arenas[0], recycle=False)
        sink.release(arenas[1])  # recycled: renamed to free-<token>, with no manifest
        monkeypatch.undo()
        assert gone == [
            f"{arenas[0].name}.sealed", arenas[0].name,
            f"{arenas[1].name}.sealed", f"link {arenas[1].name}", arenas[1].name,
        ]  # fmt: skip
        assert (store.removed, store.stored) == ([a.name for a in arenas], {})
        assert list(tmp_path.glob("*.sealed")) == []
        assert not arenas[1].sealed
        assert len(list(tmp_path.glob("*.free-*"))) == 1


async def test_systemd_descriptors_stand_in_for_the_files_and_the_gone_ones_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = FakeFdStore()
    sink = CpuShmSink(tmp_path, socket=SOCKET, adopt=True, fd_store=first)
    await sink.__aenter__()
    arena = sink.allocate(MIB, "m1")
    arena.view[:4] = b"kept"
    sink.seal(arena, _manifest())
    sink.leave(arena)
    await sink.__aexit__(None, None, None)
    kept = os.open(arena.path, os.O_RDWR)  # what systemd holds for the arena
    gone_path = tmp_path / f"tensorferry.{sink.instance}.{'c' * 32}"
    gone = os.open(gone_path, os.O_RDWR | os.O_CREAT, 0o600)
    gone_path.unlink()  # RemoveIPC=yes took the file; systemd still holds its descriptor
    store = FakeFdStore({arena.name: kept, gone_path.name: gone})
    caplog.set_level(logging.INFO, ADOPT_LOG)
    async with CpuShmSink(tmp_path, socket=SOCKET, adopt=True, fd_store=store) as second:
        (claimed,) = second.claimed
        assert claimed.fd == kept
        assert store.removed == [arena.name, gone_path.name]
        assert list(store.stored) == [claimed.path.name]
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(gone)  # closed
        adopted = second.adopt(claimed)
        assert bytes(adopted.view[:4]) == b"kept"
    assert (
        f"systemd kept the descriptor of {gone_path.name} but the file is gone from {tmp_path} "
        "(RemoveIPC=yes, or removed by hand): not adopted"
    ) in caplog.messages
    assert list(tmp_path.glob("tensorferry.*")) == []


async def test_a_daemon_sweeping_while_we_claim_keeps_what_we_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _dead_daemon(tmp_path, crash=True)
    real_seal = sealed.seal
    swept: list[list[str]] = []

    def seal_after_a_rival_swept(segment: Path, fd: int, arena: SealedArena) -> Path:
        # Another daemon starts just as our claim has linked the arena under our name.
        swept.append(CpuShmSink(tmp_path).sweep())
        return real_seal(segment, fd, arena)

    monkeypatch.setattr(adopt_shm, "write_manifest", seal_after_a_rival_swept)
    async with CpuShmSink(tmp_path, socket=SOCKET, adopt=True) as sink:
        (claimed,) = sink.claimed
        assert swept == [[]]  # our instance was locked before anything was claimed
        assert claimed.path.exists()
        assert manifest_path(claimed.path).exists()
        sink.discard(claimed, "test")
